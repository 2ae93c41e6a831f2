"""``torch.export`` of :class:`~maskrcnn.export.wrapper.ExportableMaskRCNN` (an ``ExportedProgram``, ``.pt2``).

The image height and width are exported as symbolic dimensions (``32 .. 4096``); data-dependent sizes (proposals
kept by NMS, detections above the score threshold) become unbacked symbols. ``torch.export`` specializes a size of 1
against larger ones, so the program also keeps the example's answer to "is this feature map one pixel wide (high)
at the coarsest levels": an image whose resized, padded side is one block of the coarsest stride when the
example's was more (a 1:40 image at the 800/1333 test size, a thin one at a small ``TEST.SCALE``), or the other
way round, fails with ``Guard failed``. Trace with an ``--example`` of the shape class you serve, or export to
TorchScript, which takes any size (``maskrcnn-export --check`` reports such an image as a failed check). torchvision's ``nms`` and
``roi_align`` have fake-tensor kernels, so the program holds them as operators. Load it with
:func:`load_program` (which imports torchvision to register them) and call ``program.module()(image)``.
"""
from __future__ import annotations

import os
import warnings
from typing import Union

import torch
from torch import Tensor

from ..ops._backend import use_backend
from .wrapper import ExportableMaskRCNN

__all__ = ["export_program", "load_program", "MIN_SIDE", "MAX_SIDE"]

#: Range of the exported symbolic image sides.
MIN_SIDE, MAX_SIDE = 32, 4096


def export_program(wrapper: ExportableMaskRCNN, example: Tensor, path: Union[str, os.PathLike, None] = None
                   ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``wrapper`` with dynamic ``H`` and ``W``; saved to ``path`` (``.pt2``) when given.

    Raises ``RuntimeError`` naming the failing step when PyTorch cannot export the graph.
    """
    if not isinstance(wrapper, ExportableMaskRCNN):
        raise TypeError(f"wrapper must be an ExportableMaskRCNN, got {type(wrapper).__name__}")
    from torch.export import Dim

    h, w = example.shape[-2:]
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
        raise ValueError(f"example image sides must lie in [{MIN_SIDE}, {MAX_SIDE}], got {tuple(example.shape)}")
    dims = {"image": {1: Dim("height", min=MIN_SIDE, max=MAX_SIDE), 2: Dim("width", min=MIN_SIDE, max=MAX_SIDE)}}
    with torch.no_grad(), use_backend("torchvision"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            program = torch.export.export(wrapper, (example,), dynamic_shapes=dims, strict=False)
        except Exception as e:  # torch.export raises many types; the message names the failing operator
            raise RuntimeError(f"torch.export could not export the model: {type(e).__name__}: {e}") from e
    if path is not None:
        torch.export.save(program, os.fspath(path))
    return program


def load_program(path: Union[str, os.PathLike]) -> "torch.export.ExportedProgram":
    """Load a ``.pt2`` saved by :func:`export_program` (imports torchvision for its operators)."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms / roi_align)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported program at {os.fspath(path)!r}")
    return torch.export.load(os.fspath(path))
