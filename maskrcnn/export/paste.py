"""Pasting an exported model's ``M x M`` mask probabilities into the image.

Two methods, as ``TEST.MASK_PASTE_METHOD`` names them:

* ``"torchvision"`` (torchvision's and Detectron's ``paste_masks_in_image``): the mask is zero-padded by
  ``padding`` pixels, its box expanded by ``(M + 2p) / M`` about the centre and truncated to ints, the padded mask
  bilinearly resized, ``align_corners=False``, to the integer box and written into a zero image.
* ``"detectron2"`` (detectron2's ``paste_masks_in_image``, :func:`~maskrcnn.ops.grid_paste.paste_masks_grid_sample`):
  image pixel ``(x, y)`` samples the mask bilinearly at its centre's place in the float box (zeros outside the
  mask), within the window ``floor(x0) - 1 .. ceil(x1) + 1``. No integer rounding of the box: on objects of a few
  pixels its masks are much closer to the truth.

Each in two forms:

* :func:`paste_masks`: on the user side, for the ``(N, 1, M, M)`` output of an exported model (NumPy arrays from
  ONNX Runtime / OpenVINO, or tensors); it is the package's own eager paste of that method.
* :func:`paste_masks_dense`: inside an exported graph (``paste_masks=True``). Loops and data-dependent slices do
  not export, so each mask is resized by two dense interpolation matrices, ``Wy (H, M') @ mask @ Wx^T``, whose
  rows hold the two bilinear taps of each image row/column inside the box (or window) and zeros elsewhere. Same
  taps and weights as the eager paste; only the float rounding of the blend may differ.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.masks import check_paste_method, expanded_int_boxes, paste_masks_by_method

__all__ = ["paste_masks", "paste_masks_dense"]

ArrayLike = Union[Tensor, np.ndarray]


def paste_masks(masks: ArrayLike, boxes: ArrayLike, image_size: Sequence[int], padding: int = 1,
                threshold: float = None, method: str = "torchvision") -> ArrayLike:
    """Paste ``(N, 1, M, M)`` (or ``(N, M, M)``) probabilities of ``boxes`` ``(N, 4)`` (x1y1x2y2, image pixels)
    into an image of ``image_size`` = ``(H, W)``.

    Returns ``(N, 1, H, W)`` float probabilities, or bool masks ``> threshold`` when ``threshold`` is given, of
    the same kind as ``masks`` (NumPy array or tensor). ``method`` is the model's ``TEST.MASK_PASTE_METHOD``
    (``maskrcnn-export`` prints it); ``padding`` is ``TEST.MASK_PASTE_PADDING`` (1), read by ``"torchvision"``
    only.
    """
    as_numpy = isinstance(masks, np.ndarray)
    m = torch.as_tensor(np.asarray(masks) if as_numpy else masks).float()
    b = torch.as_tensor(np.asarray(boxes) if isinstance(boxes, np.ndarray) else boxes).float()
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size!r}")
    out = paste_masks_by_method(m, b, (int(image_size[0]), int(image_size[1])), method, int(padding))
    if threshold is not None:
        out = out > float(threshold)
    return out.numpy() if as_numpy else out


def _two_tap_matrix(i0: Tensor, i1: Tensor, w0: Tensor, w1: Tensor, inside: Tensor, n: int) -> Tensor:
    """``(N, S, n)`` rows holding weight ``w0`` at source index ``i0`` and ``w1`` at ``i1`` (indices outside
    ``[0, n)`` match no column, which is zero padding), zeroed where ``inside`` (``(N, S)`` bool) is False."""
    taps = torch.arange(n, device=i0.device)[None, None, :]
    weights = (w0[..., None] * (taps == i0[..., None]).to(w0.dtype)
               + w1[..., None] * (taps == i1[..., None]).to(w1.dtype))
    return weights * inside.to(w0.dtype)[..., None]


def _interpolation_matrix(lo: Tensor, hi: Tensor, size: Tensor, padded: int, dtype: torch.dtype) -> Tensor:
    """``(N, size, padded)`` bilinear weights that resize ``padded`` source pixels onto the integer span
    ``[lo, hi]`` of an axis of ``size`` pixels (rows outside the span are zero)."""
    pos = torch.arange(size, device=lo.device)[None, :]  # (1, S) image coordinate
    length = (hi - lo + 1)[:, None]  # (N, 1) pixels of the resized mask
    dst = (pos - lo[:, None]).to(dtype)
    scale = float(padded) / length.to(dtype)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.to(torch.int64)
    i1 = torch.clamp(i0 + 1, max=padded - 1)
    l1 = src - i0.to(dtype)
    inside = (pos >= lo[:, None]) & (pos <= hi[:, None])
    return _two_tap_matrix(i0, i1, 1.0 - l1, l1, inside, padded)


def _grid_sample_matrix(lo: Tensor, hi: Tensor, size: Tensor, m: int) -> Tensor:
    """``(N, size, m)`` weights of ``F.grid_sample(align_corners=False)`` (bilinear, zeros outside) along an axis:
    pixel ``p`` samples the mask at ``(p + 0.5 - lo) / (hi - lo) * m - 0.5``; pixels outside the window
    ``[floor(lo) - 1, ceil(hi) + 1)`` are zero, as in :func:`~maskrcnn.ops.grid_paste.paste_masks_grid_sample`."""
    pos = torch.arange(size, device=lo.device)[None, :]  # (1, S)
    extent = (hi - lo)[:, None]
    src = (pos.to(torch.float32) + 0.5 - lo[:, None]) / extent * float(m) - 0.5
    # A box of zero extent (or a NaN coordinate) samples nothing, rather than poisoning the matmul with NaN.
    src = torch.where(torch.isfinite(src), src, torch.full_like(src, -2.0))
    i0 = torch.floor(src)
    l1 = src - i0
    i0 = i0.to(torch.int64)
    window = (pos >= torch.floor(lo)[:, None] - 1) & (pos < torch.ceil(hi)[:, None] + 1)
    return _two_tap_matrix(i0, i0 + 1, 1.0 - l1, l1, window, m)


def paste_masks_dense(masks: Tensor, boxes: Tensor, image_hw: Union[Tensor, Tuple[int, int]], padding: int = 1,
                      method: str = "torchvision") -> Tensor:
    """Traceable paste: ``(N, 1, M, M)`` probabilities and ``(N, 4)`` boxes -> ``(N, 1, H, W)``.

    ``image_hw`` is ``(H, W)`` ints or a ``(2,)`` int64 tensor (dynamic in a traced graph). ``method`` as in
    :func:`paste_masks` (``padding`` is read by ``"torchvision"`` only).
    """
    check_paste_method(method)
    if masks.dim() == 4:
        masks = masks[:, 0]
    if not isinstance(image_hw, Tensor):
        image_hw = torch.tensor([int(image_hw[0]), int(image_hw[1])], dtype=torch.int64)
    boxes = boxes.float()
    m = masks.shape[-1]
    if method == "detectron2":
        source = masks.float()
        wy = _grid_sample_matrix(boxes[:, 1], boxes[:, 3], image_hw[0], m)  # (N, H, M)
        wx = _grid_sample_matrix(boxes[:, 0], boxes[:, 2], image_hw[1], m)  # (N, W, M)
    else:
        padded_size = m + 2 * int(padding)
        source = F.pad(masks.float(), [int(padding)] * 4)
        x1, y1, x2, y2 = expanded_int_boxes(boxes, float(padded_size) / m)
        wy = _interpolation_matrix(y1, y2, image_hw[0], padded_size, torch.float32)  # (N, H, P)
        wx = _interpolation_matrix(x1, x2, image_hw[1], padded_size, torch.float32)  # (N, W, P)
    return torch.matmul(torch.matmul(wy, source), wx.transpose(1, 2))[:, None]
