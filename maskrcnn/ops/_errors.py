"""Exceptions of the ops' argument checks, catchable both as this package documents them and as code written for
torchvision's ops expects them (its C++ checks raise ``RuntimeError``; ``check_roi_boxes_shape``'s ``torch._assert``
raises ``AssertionError``)."""
from __future__ import annotations

__all__ = ["OpArgumentError", "RoIShapeError"]


class OpArgumentError(ValueError, RuntimeError):
    """A tensor argument of the wrong shape or dtype (``nms``, ``batched_nms``, the box ops): a ``ValueError``, and a
    ``RuntimeError`` as torchvision raises for the same input."""


class RoIShapeError(ValueError, AssertionError):
    """RoIs that are neither a ``(R, 5)`` tensor nor a list of ``(Ri, 4)`` tensors (``roi_align``, ``roi_pool``): a
    ``ValueError``, and an ``AssertionError`` as torchvision raises for the same input."""
