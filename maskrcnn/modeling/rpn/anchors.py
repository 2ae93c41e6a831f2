"""Anchor generation for single-level (C4) and multi-level (FPN) RPNs.

Two conventions:

* torchvision's (default): cell anchors ``round([-w, -h, w, h] / 2)`` with ``h = size * sqrt(r)``,
  ``w = size / sqrt(r)``, centred on ``(x * stride, y * stride)``; continuous box widths.
* Detectron's (``legacy_plus_one=True``): ``generate_anchors`` from the base box ``[0, 0, stride-1, stride-1]``,
  enumerating ratios (rounded widths) then scales, centred on ``(stride - 1) / 2`` with ``+1`` widths.

Anchors of a level are ordered location-major (row, column), then anchor (ratio-major, then size) — the order
in which the head's ``(N, A, H, W)`` outputs are flattened after a permute to ``(N, H, W, A)``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "torchvision_cell_anchors", "detectron_cell_anchors"]


def torchvision_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``(len(ratios) * len(sizes), 4)`` zero-centred anchors, torchvision's rounding."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws, hs = ws[:, None], hs[:, None]
    return torch.cat([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1),
                      y_ctr + 0.5 * (hs - 1)], dim=1)


def detectron_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Detectron's ``generate_anchors(stride, sizes, aspect_ratios)`` (legacy ``+1`` box widths), float64 maths."""
    base = torch.tensor([0.0, 0.0, stride - 1.0, stride - 1.0], dtype=torch.float64)
    w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
    x_ctr, y_ctr = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
    size_ratios = (w * h) / ratios
    ws = torch.round(torch.sqrt(size_ratios))
    hs = torch.round(ws * ratios)
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    scales = torch.as_tensor(sizes, dtype=torch.float64) / stride
    out = []
    for a in ratio_anchors:
        aw, ah = a[2] - a[0] + 1, a[3] - a[1] + 1
        ax, ay = a[0] + 0.5 * (aw - 1), a[1] + 0.5 * (ah - 1)
        out.append(_mkanchors(aw * scales, ah * scales, ax, ay))
    return torch.cat(out).to(torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for each feature level.

    Args:
        sizes: per level, anchor sizes (sqrt of area, input pixels).
        aspect_ratios: per level, ratios h / w.
        strides: per level, input pixels per feature cell; ``None`` infers them from the padded batch size
            (``batch_size // feature_size`` per axis, torchvision's rule) at each call.
        legacy_plus_one: Detectron's anchors (see module docstring); needs explicit strides.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Optional[Sequence[int]] = None, legacy_plus_one: bool = False):
        super().__init__()
        sizes = [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes]
        aspect_ratios = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in aspect_ratios]
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = aspect_ratios * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes ({len(sizes)} levels) and aspect_ratios ({len(aspect_ratios)} levels) differ")
        if strides is not None and len(strides) != len(sizes):
            raise ValueError(f"strides ({len(strides)} levels) and sizes ({len(sizes)} levels) differ")
        if legacy_plus_one and strides is None:
            raise ValueError("Detectron anchors (legacy_plus_one=True) need explicit strides")
        self.sizes, self.aspect_ratios = sizes, aspect_ratios
        self.strides = None if strides is None else [int(s) for s in strides]
        self.legacy_plus_one = legacy_plus_one
        if legacy_plus_one:
            cells = [detectron_cell_anchors(st, s, r) for st, s, r in zip(self.strides, sizes, aspect_ratios)]
        else:
            cells = [torchvision_cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        self.cell_anchors = cells
        self._cache: Dict[Tuple, Tensor] = {}

    @classmethod
    def from_cfg(cls, cfg, spatial_scales: Optional[Sequence[float]] = None) -> "AnchorGenerator":
        legacy = bool(cfg.MODEL.LEGACY_PLUS_ONE)
        if cfg.FPN.FPN_ON and cfg.FPN.MULTILEVEL_RPN:
            lo, hi = cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL
            sizes = [(cfg.FPN.RPN_ANCHOR_START_SIZE * 2.0 ** (lvl - lo),) for lvl in range(lo, hi + 1)]
            ratios = [tuple(cfg.FPN.RPN_ASPECT_RATIOS)] * len(sizes)
            strides = None if cfg.FPN.RPN_ANCHOR_STRIDES_FROM_SIZE and not legacy else [
                2 ** lvl for lvl in range(lo, hi + 1)]
            return cls(sizes, ratios, strides, legacy)
        stride = cfg.RPN.STRIDE
        if spatial_scales is not None and len(spatial_scales) == 1:
            stride = int(round(1.0 / spatial_scales[0]))
        return cls([tuple(cfg.RPN.SIZES)], [tuple(cfg.RPN.ASPECT_RATIOS)], [stride], legacy)

    def num_anchors_per_location(self) -> List[int]:
        return [c.shape[0] for c in self.cell_anchors]

    def grid_anchors(self, level: int, grid: Tuple[int, int], stride: Tuple[int, int], device, dtype) -> Tensor:
        key = (level, grid, stride, device, dtype)
        if key not in self._cache:
            h, w = grid
            sy, sx = stride
            shifts_x = torch.arange(0, w, dtype=torch.int32, device=device) * sx
            shifts_y = torch.arange(0, h, dtype=torch.int32, device=device) * sy
            yy, xx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1).to(dtype)
            base = self.cell_anchors[level].to(device=device, dtype=dtype)
            self._cache[key] = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
        return self._cache[key]

    def forward(self, features: List[Tensor], batch_shape: Optional[Sequence[int]] = None) -> List[Tensor]:
        """Per level ``(H_l * W_l * A_l, 4)`` anchors (the same for every image of the padded batch).

        ``batch_shape`` is the padded batch ``(H, W)``; required when strides are inferred.
        """
        if len(features) != len(self.cell_anchors):
            raise ValueError(f"got {len(features)} feature levels but anchors are defined for "
                             f"{len(self.cell_anchors)}")
        out = []
        for lvl, f in enumerate(features):
            grid = (int(f.shape[-2]), int(f.shape[-1]))
            if self.strides is not None:
                stride = (self.strides[lvl], self.strides[lvl])
            else:
                if batch_shape is None:
                    raise ValueError("this AnchorGenerator infers strides from the padded batch size: pass "
                                     "batch_shape")
                stride = (int(batch_shape[0]) // grid[0], int(batch_shape[1]) // grid[1])
            # Always float32: anchors feed box decoding, which must not run in bf16/fp16.
            out.append(self.grid_anchors(lvl, grid, stride, f.device, torch.float32))
        if len(self._cache) > 64:  # many distinct image sizes: keep memory bounded
            self._cache.clear()
        return out
