"""Mixed-precision settings shared by training and inference: the one map from the config's AMP names to dtypes.

``TRAIN.AMP`` / ``TEST.AMP`` take ``''`` (off), ``'bf16'`` (CPU or CUDA) or ``'fp16'`` (CUDA only; training adds a
``GradScaler``). Training enters :func:`autocast_context` around each step (:mod:`maskrcnn.engine.trainer`);
inference installs the autocast region, with its fp32 islands, on the model
(:func:`maskrcnn.engine.speed.enable_amp`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Union

import torch

__all__ = ["AMP_DTYPES", "autocast_context", "check_amp"]

#: Config name -> autocast dtype.
AMP_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: Union[str, torch.device], what: str = "amp") -> None:
    """Raise ``ValueError`` naming ``what`` (e.g. ``'TEST.AMP'``) unless ``amp`` is ``''``, ``'bf16'`` or
    ``'fp16'``, and ``'fp16'`` comes with a CUDA ``device``."""
    if amp not in ("",) + tuple(AMP_DTYPES):
        raise ValueError(f"{what} must be '', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"{what}='fp16' needs a CUDA device; use 'bf16' on the CPU")


def autocast_context(amp: str, device: Union[str, torch.device]):
    """``torch.autocast`` for ``amp`` (``'fp16'`` / ``'bf16'``) on ``device``, or a null context when ``amp`` is
    ``''``."""
    device = torch.device(device)
    check_amp(amp, device)
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])
