"""Anchor generation for single-level (C4) and multi-level (FPN) RPNs.

Three conventions, chosen by ``legacy_plus_one`` and ``rounded``:

* torchvision's (default): zero-centred cell anchors ``round([-w, -h, w, h] / 2)`` with ``h = size * sqrt(r)``,
  ``w = size / sqrt(r)`` (``r = h / w``) in float32, shifted to ``(x * stride, y * stride)``; continuous box widths.
  Equal to ``torchvision.models.detection.anchor_utils.AnchorGenerator``.
* detectron2's (``rounded=False``): the same zero-centred cell anchors, not rounded, computed as detectron2's
  ``DefaultAnchorGenerator.generate_cell_anchors`` does (``w = sqrt(size**2 / r)``, ``h = r * w`` in float64, then
  float32), shifted by ``(x * stride, y * stride)`` (its ``ANCHOR_GENERATOR.OFFSET`` 0.0).
* Detectron's (``legacy_plus_one=True``): ``generate_anchors(stride, sizes, aspect_ratios)``: the base box
  ``[0, 0, stride - 1, stride - 1]`` is reshaped to each ratio keeping its area (widths and heights rounded), then
  scaled by ``size / stride``, all centred on ``((stride - 1) / 2, (stride - 1) / 2)``; inclusive ``+1`` widths.
  This is what weights trained by Detectron expect.

Cell anchors are ordered ratio-major then size (both conventions). The anchors of a level are ordered
location-major (row, then column), then cell anchor: the order of the head's ``(N, A, H, W)`` outputs after a
permute to ``(N, H, W, A)`` and a flatten.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "torchvision_cell_anchors", "detectron2_cell_anchors", "detectron_cell_anchors"]

# Distinct (level, grid, stride, device, dtype) entries kept; many image sizes (multi-scale training) would
# otherwise grow the cache without bound.
_MAX_CACHED = 64


def torchvision_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``(len(aspect_ratios) * len(sizes), 4)`` float32 zero-centred anchors, torchvision's float32 rounding."""
    scales = torch.as_tensor(list(sizes), dtype=torch.float32)
    ratios = torch.as_tensor(list(aspect_ratios), dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def detectron2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``(len(aspect_ratios) * len(sizes), 4)`` float32 zero-centred anchors, not rounded: detectron2's
    ``generate_cell_anchors`` arithmetic (Python floats, i.e. float64, then float32).

    Ordered ratio-major then size, as the other conventions here (detectron2 orders size-major; its checkpoints'
    RPN channels are reordered by the converter, so that both orders describe the same anchors)."""
    rows = []
    for r in aspect_ratios:
        for size in sizes:
            w = math.sqrt(float(size) ** 2.0 / float(r))
            h = float(r) * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows, dtype=torch.float32)


def _boxes_around(ws: Tensor, hs: Tensor, x_ctr: Tensor, y_ctr: Tensor) -> Tensor:
    # Inclusive coordinates: a box of w pixels centred on c spans c - (w-1)/2 .. c + (w-1)/2.
    return torch.stack([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1),
                        y_ctr + 0.5 * (hs - 1)], dim=-1)


def detectron_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Detectron's ``generate_anchors(stride, sizes, aspect_ratios)`` as a ``(R * S, 4)`` float32 tensor.

    Computed in float64 as Detectron does in NumPy (``torch.round`` rounds half to even like ``np.round``).
    """
    base = float(stride)
    ctr = torch.tensor(0.5 * (base - 1), dtype=torch.float64)
    ratios = torch.as_tensor(list(aspect_ratios), dtype=torch.float64)
    # Ratio enumeration keeps the base area; the rounding is what makes these anchors differ from torchvision's.
    ws = torch.round(torch.sqrt(base * base / ratios))
    hs = torch.round(ws * ratios)
    scales = torch.as_tensor(list(sizes), dtype=torch.float64) / base
    # The ratio boxes share the base centre, so scaling them about it needs no recomputed centres.
    ws = (ws[:, None] * scales[None, :]).reshape(-1)
    hs = (hs[:, None] * scales[None, :]).reshape(-1)
    return _boxes_around(ws, hs, ctr, ctr).to(torch.float32)


def _per_level(values, name: str) -> List[Tuple[float, ...]]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{name} must be a non-empty sequence (one entry per level), got {values!r}")
    levels = []
    for i, v in enumerate(values):
        level = tuple(v) if isinstance(v, Sequence) else (v,)
        if len(level) == 0 or not all(isinstance(x, Real) and math.isfinite(x) and x > 0 for x in level):
            raise ValueError(f"{name}[{i}] must be a non-empty sequence of positive numbers, got {v!r}")
        levels.append(tuple(float(x) for x in level))
    return levels


class AnchorGenerator(nn.Module):
    """Anchors of every feature level, the same for every image of a padded batch.

    Args:
        sizes: per level, anchor sizes (square root of the area, input pixels), e.g. ``((32,), (64,), ...)``
            for FPN or ``((32, 64, 128, 256, 512),)`` for C4. A flat sequence of numbers means one size per
            level (torchvision's rule).
        aspect_ratios: per level, ratios ``h / w``; a flat sequence of numbers is used for every level.
        strides: per level, input pixels per feature cell. ``None`` infers each level's stride from the padded
            batch size (``batch // feature`` per axis, torchvision's rule; with FPN its P6 stride is then not
            64); ``forward`` then needs ``batch_shape``.
        legacy_plus_one: Detectron's anchors (see the module docstring); needs explicit strides.
        rounded: round the cell anchors to integers (torchvision); False keeps detectron2's exact ones. Detectron's
            anchors (``legacy_plus_one``) have their own rounding and need ``rounded=True``.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Optional[Sequence[int]] = None, legacy_plus_one: bool = False, rounded: bool = True):
        super().__init__()
        sizes_l = _per_level(sizes, "sizes")
        if isinstance(aspect_ratios, Sequence) and len(aspect_ratios) > 0 and all(
                isinstance(r, Real) for r in aspect_ratios):
            aspect_ratios = [tuple(aspect_ratios)] * len(sizes_l)
        ratios_l = _per_level(aspect_ratios, "aspect_ratios")
        if len(ratios_l) != len(sizes_l):
            raise ValueError(f"sizes has {len(sizes_l)} levels but aspect_ratios has {len(ratios_l)}")
        if strides is not None:
            strides = list(strides)
            if len(strides) != len(sizes_l):
                raise ValueError(f"strides has {len(strides)} levels but sizes has {len(sizes_l)}")
            if not all(isinstance(s, Real) and int(s) == s and s > 0 for s in strides):
                raise ValueError(f"strides must be positive integers, got {strides!r}")
            strides = [int(s) for s in strides]
        elif legacy_plus_one:
            raise ValueError("legacy_plus_one=True (Detectron anchors) needs explicit strides, got strides=None")
        if legacy_plus_one and not rounded:
            raise ValueError("rounded=False selects detectron2's unrounded anchors; legacy_plus_one=True selects "
                             "Detectron's, which are rounded: set one of them, not both")
        self.sizes = sizes_l
        self.aspect_ratios = ratios_l
        self.strides: Optional[List[int]] = strides
        self.legacy_plus_one = bool(legacy_plus_one)
        self.rounded = bool(rounded)
        if self.legacy_plus_one:
            self.cell_anchors = [detectron_cell_anchors(st, s, r) for st, s, r in zip(strides, sizes_l, ratios_l)]
        elif not self.rounded:
            self.cell_anchors = [detectron2_cell_anchors(s, r) for s, r in zip(sizes_l, ratios_l)]
        else:
            self.cell_anchors = [torchvision_cell_anchors(s, r) for s, r in zip(sizes_l, ratios_l)]
        # Plain attributes, not buffers: anchors are a function of the configuration, never stored in checkpoints.
        self._cache: Dict[tuple, Tensor] = {}

    @classmethod
    def from_cfg(cls, cfg, spatial_scales: Optional[Sequence[float]] = None) -> "AnchorGenerator":
        """FPN (``FPN.FPN_ON``): levels ``FPN.RPN_MIN_LEVEL..RPN_MAX_LEVEL`` with size
        ``RPN_ANCHOR_START_SIZE * 2**(l - min)``, stride ``2**l`` (inferred from the batch with
        ``FPN.RPN_ANCHOR_STRIDES_FROM_SIZE``) and ratios ``FPN.RPN_ASPECT_RATIOS``. Otherwise one level with
        ``RPN.SIZES``, ``RPN.ASPECT_RATIOS`` and stride ``RPN.STRIDE``, or ``1 / spatial_scales[0]`` when the body's
        single scale is given (e.g. a conv5 body). ``MODEL.LEGACY_PLUS_ONE`` selects Detectron's anchors,
        ``RPN.ROUND_ANCHORS`` False detectron2's."""
        legacy = bool(cfg.MODEL.LEGACY_PLUS_ONE)
        rounded = bool(cfg.RPN.ROUND_ANCHORS)
        if legacy and not rounded:
            raise ValueError("RPN.ROUND_ANCHORS = False (detectron2's unrounded anchors) cannot be combined with "
                             "MODEL.LEGACY_PLUS_ONE = True (Detectron's anchors, rounded their own way): set "
                             "RPN.ROUND_ANCHORS True for Detectron weights")
        if cfg.FPN.FPN_ON:
            if not cfg.FPN.MULTILEVEL_RPN:
                raise ValueError("FPN.MULTILEVEL_RPN = False (a single-level RPN on an FPN body) is not supported")
            lo, hi = int(cfg.FPN.RPN_MIN_LEVEL), int(cfg.FPN.RPN_MAX_LEVEL)
            sizes = [(float(cfg.FPN.RPN_ANCHOR_START_SIZE) * 2.0 ** (lvl - lo),) for lvl in range(lo, hi + 1)]
            ratios = [tuple(cfg.FPN.RPN_ASPECT_RATIOS)] * len(sizes)
            strides = [2 ** lvl for lvl in range(lo, hi + 1)]
            if cfg.FPN.RPN_ANCHOR_STRIDES_FROM_SIZE:
                if legacy:
                    raise ValueError("FPN.RPN_ANCHOR_STRIDES_FROM_SIZE = True is torchvision's rule; it cannot be "
                                     "combined with MODEL.LEGACY_PLUS_ONE = True (Detectron anchors)")
                strides = None
            return cls(sizes, ratios, strides, legacy, rounded)
        stride = int(cfg.RPN.STRIDE)
        if spatial_scales is not None:
            if len(spatial_scales) != 1:
                raise ValueError(f"a single-level RPN needs one spatial scale, got {list(spatial_scales)}")
            stride = int(round(1.0 / float(spatial_scales[0])))
        return cls([tuple(cfg.RPN.SIZES)], [tuple(cfg.RPN.ASPECT_RATIOS)], [stride], legacy, rounded)

    def num_anchors_per_location(self) -> List[int]:
        """Cell anchors (A) per level."""
        return [int(c.shape[0]) for c in self.cell_anchors]

    def grid_anchors(self, level: int, grid: Tuple[int, int], stride: Tuple[int, int], device: torch.device,
                     dtype: torch.dtype) -> Tensor:
        """``(H * W * A, 4)`` anchors of ``level`` on an ``(H, W)`` grid with ``(stride_y, stride_x)``; cached."""
        key = (level, grid, stride, torch.device(device), dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            (h, w), (sy, sx) = grid, stride
            # Integer shifts, converted once: exact, as torchvision computes them.
            xs = torch.arange(w, dtype=torch.int64, device=device) * sx
            ys = torch.arange(h, dtype=torch.int64, device=device) * sy
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1).to(dtype)
            cell = self.cell_anchors[level].to(device=device, dtype=dtype)
            anchors = (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def forward(self, features: Sequence[Tensor], batch_shape: Optional[Sequence[int]] = None) -> List[Tensor]:
        """Anchors per level for ``features`` (one ``(N, C, H_l, W_l)`` tensor per level).

        Args:
            batch_shape: ``(H, W)`` of the padded input batch; needed only when strides are inferred.

        Returns:
            per level ``(H_l * W_l * A_l, 4)`` xyxy anchors on the features' device, float32 (float64 for float64
            features): half-precision features (autocast) keep float32 anchors, whose pixel coordinates fp16
            could not represent.
        """
        if isinstance(features, Tensor):
            features = [features]
        if len(features) != len(self.cell_anchors):
            raise ValueError(f"got {len(features)} feature levels but the anchor generator has "
                             f"{len(self.cell_anchors)} (sizes {self.sizes})")
        if self.strides is None and batch_shape is None:
            raise ValueError("this AnchorGenerator infers strides from the padded batch size (strides=None): "
                             "pass batch_shape=(H, W)")
        out = []
        for level, f in enumerate(features):
            if f.dim() < 2:
                raise ValueError(f"features[{level}] must be (N, C, H, W), got shape {tuple(f.shape)}")
            grid = (int(f.shape[-2]), int(f.shape[-1]))
            if self.strides is not None:
                stride = (self.strides[level], self.strides[level])
            else:
                if grid[0] == 0 or grid[1] == 0:
                    raise ValueError(f"features[{level}] has an empty grid {grid}")
                stride = (int(batch_shape[0]) // grid[0], int(batch_shape[1]) // grid[1])
            dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
            out.append(self.grid_anchors(level, grid, stride, f.device, dtype))
        return out

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}, "
                f"legacy_plus_one={self.legacy_plus_one}, rounded={self.rounded}")
