"""TorchScript export of :class:`~maskrcnn.export.wrapper.ExportableMaskRCNN` by tracing.

``torch.jit.trace`` records the operators one image runs through; the wrapper computes every size from tensor
shapes, so the traced graph serves any image size. Only the input dtype (uint8 or float32) is fixed by the
example. Scripting (``torch.jit.script``) is not offered: the model's modules accept several input forms
(lists, dicts, NumPy RoIs) for the Detectron API, which TorchScript's type system cannot express.

The saved file loads with ``torch.jit.load(path)`` in any PyTorch process that has loaded ``torchvision``
(its ``nms`` / ``roi_align`` operators are in the graph); ``maskrcnn`` itself is not needed.
"""
from __future__ import annotations

import os
import warnings
from typing import Union

import torch
from torch import Tensor

from ..ops._backend import use_backend
from .wrapper import ExportableMaskRCNN

__all__ = ["trace_torchscript", "load_torchscript"]


def trace_torchscript(wrapper: ExportableMaskRCNN, example: Tensor, path: Union[str, os.PathLike, None] = None
                      ) -> torch.jit.ScriptModule:
    """Trace ``wrapper`` on ``example`` (one ``(3, H, W)`` image of the wrapper's input dtype) and save it to
    ``path`` when given. Returns the traced module."""
    if not isinstance(wrapper, ExportableMaskRCNN):
        raise TypeError(f"wrapper must be an ExportableMaskRCNN, got {type(wrapper).__name__}")
    with torch.no_grad(), use_backend("torchvision"), warnings.catch_warnings():
        # The tracer warns about every Python-level shape check of the model's input validation; those checks
        # pass on the example and guard nothing a traced graph could violate.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated.*")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    if path is not None:
        traced.save(os.fspath(path))
    return traced


def load_torchscript(path: Union[str, os.PathLike]) -> torch.jit.ScriptModule:
    """Load a traced model saved by :func:`trace_torchscript` (imports torchvision for its operators)."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms / roi_align)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no TorchScript file at {os.fspath(path)!r}")
    return torch.jit.load(os.fspath(path), map_location="cpu")
