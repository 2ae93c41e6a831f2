"""PIL's bilinear ``Image.resize`` of 8-bit images, bit for bit, in PyTorch.

detectron2 resizes its inputs with ``ResizeShortestEdge`` (``PIL.Image.resize(..., Image.BILINEAR)`` on the uint8
image), which is not torch's bilinear interpolation: PIL widens the filter when it downscales (antialiasing), and
it works in fixed point with a rounding after each of its two passes. ``F.interpolate(uint8, antialias=True)``
comes close but differs by 1 on ~0.2% of the pixels. This module reproduces Pillow's ``libImaging/Resample.c``:

* per axis (``precompute_coeffs``): ``scale = in / out``, ``filterscale = max(scale, 1)``, support
  ``filterscale`` (the triangle filter's support is 1); output pixel ``o`` has centre ``(o + 0.5) * scale`` and
  taps ``xmin = int(centre - support + 0.5)`` (clamped at 0) to ``int(centre + support + 0.5)`` (clamped at
  ``in``), weight ``triangle((x + xmin - centre + 0.5) / filterscale)``, normalised by their sum (in float64);
* ``normalize_coeffs_8bpc``: weights to 22-bit fixed point, ``int(w * 2**22 +- 0.5)`` (rounding half away from 0);
* the horizontal pass first, then the vertical one on its 8-bit output, each
  ``clip8((2**21 + sum(pixel * weight)) >> 22)``; a pass is skipped when its size does not change.

The pass order is Pillow's classic one (horizontal first). Pillow 13 (python-pillow/Pillow#9549) resizes some sizes
vertically first, where the height shrinks while the width grows or shrinks less; the 8-bit rounding between the
passes then moves about a quarter of the pixels by one level (tests/ops/test_pil_resize.py shows where).

Integer sums of at most ``255 * 2**22 * (1 + eps)`` fit int32 as in Pillow, so the result is exact on any device.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["pil_bilinear_resize"]

_PRECISION_BITS = 32 - 8 - 2


def _fixed_point_coeffs(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(out, ksize)`` int64 tap indices (clamped into the input) and int32 fixed-point weights of one axis."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    # C's (int) cast truncates towards zero; negative starts are clamped to 0 right after, as in Pillow.
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64) - xmin
    weights = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for x in range(ksize):  # summed tap by tap, in Pillow's order, so that the float64 sums round alike
        arg = np.abs(((x + xmin) - centre + 0.5) * ss)
        w = np.where(arg < 1.0, 1.0 - arg, 0.0)
        w = np.where(x < xmax, w, 0.0)
        weights[:, x] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    index = np.minimum(xmin[:, None] + np.arange(ksize)[None, :], in_size - 1)
    return index, fixed


def _pass(image: Tensor, in_size: int, out_size: int, dim: int) -> Tensor:
    """One separable pass of ``image`` (int32, values 0..255) along ``dim`` (-1: width, -2: height)."""
    index, fixed = _fixed_point_coeffs(in_size, out_size)
    index = torch.from_numpy(index).to(image.device)
    fixed = torch.from_numpy(fixed).to(image.device)
    acc = torch.full((), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for k in range(index.shape[1]):
        taps = image.index_select(dim, index[:, k])
        w = fixed[:, k] if dim == -1 else fixed[:, k, None]
        acc = acc + taps * w
    # clip8: negative sums give 0, sums from 256 << 22 give 255; otherwise an arithmetic shift (floor).
    return torch.bitwise_right_shift(acc, _PRECISION_BITS).clamp_(0, 255)


def pil_bilinear_resize(image: Tensor, size: Sequence[int]) -> Tensor:
    """``PIL.Image.resize((w, h), Image.BILINEAR)`` of an 8-bit image, channel by channel.

    Args:
        image: ``(C, H, W)`` uint8, or a floating-point tensor holding integer values in ``[0, 255]`` (other values
            are rounded and clamped into it, as converting to uint8 would).
        size: ``(h, w)`` of the output.

    Returns:
        ``(C, h, w)`` integer-valued tensor of ``image``'s dtype and device, equal to Pillow's result in every
        pixel.
    """
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"pil_bilinear_resize: image must be a (C, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"pil_bilinear_resize: size must be positive (h, w), got {tuple(size)}")
    in_h, in_w = int(image.shape[-2]), int(image.shape[-1])
    if in_h == 0 or in_w == 0:
        raise ValueError(f"pil_bilinear_resize: empty image of shape {tuple(image.shape)}")
    dtype = image.dtype
    x = image.to(torch.int32) if dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.int32)
    if out_w != in_w:  # Pillow: horizontal pass first
        x = _pass(x, in_w, out_w, -1)
    if out_h != in_h:
        x = _pass(x, in_h, out_h, -2)
    return x.to(dtype)
