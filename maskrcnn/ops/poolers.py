"""FPN RoI feature extraction: level assignment (FPN paper, eq. 1) and multi-level RoIAlign.

:class:`MultiLevelRoIAlign` returns what ``torchvision.ops.MultiScaleRoIAlign`` returns for the same
levels, except that scales are given explicitly (torchvision infers ``2 ** round(log2(feat / img))``
from the shapes) and that ``aligned`` is configurable (torchvision's is always False).

The native path does not loop over levels: all levels are packed into one ``(sum_l N*H_l*W_l, C)``
channels-last table, each RoI's sampling rows are offset into its level's block, and one
weighted ``embedding_bag`` gathers every RoI (see :mod:`maskrcnn.ops.roi_align`). With the
``"torchvision"`` backend it loops over levels like torchvision does.
"""

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from maskrcnn.ops import _backend
from maskrcnn.ops.roi_align import (
    RoIs,
    apply_roi_align_plan,
    as_roi_tensor,
    check_batch_index,
    check_features,
    compute_dtype,
    pair_size,
    roi_align,
    roi_align_plan,
)


class LevelMapper:
    """Pyramid level of each box: ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``.

    The level is clamped to ``[k_min, k_max]`` and returned minus ``k_min`` (so 0 is the finest
    level used), as int64 of shape (R,). Boxes: (R, 4) ``x1, y1, x2, y2`` or a list of (Ri, 4)
    per image (concatenated in order); ``area = (x2 - x1) * (y2 - y1)`` in the boxes' dtype (float16 and
    bfloat16 boxes in float32, as torchvision's ``box_area``).
    """

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6):
        if int(k_min) != k_min or int(k_max) != k_max or k_min > k_max:
            raise ValueError(f"need integer levels k_min <= k_max, got k_min={k_min!r}, k_max={k_max!r}")
        if canonical_scale <= 0:
            raise ValueError(f"canonical_scale must be positive, got {canonical_scale!r}")
        self.k_min = int(k_min)
        self.k_max = int(k_max)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.eps = eps

    def __call__(self, boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        if not isinstance(boxes, Tensor):
            if len(boxes) == 0:
                raise ValueError("boxes is an empty list; pass one (Ri, 4) tensor per image")
            boxes = torch.cat(list(boxes), 0)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (R, 4) (or a list of (Ri, 4)), got shape {tuple(boxes.shape)}")
        if not boxes.is_floating_point() or boxes.dtype not in (torch.float32, torch.float64):
            # float16 areas overflow (65504 is a 256x256 box) and send large boxes to the top level; torchvision's
            # box_area upcasts too.
            boxes = boxes.float()
        s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        # torchvision's operation order, so that boxes on a level boundary land identically.
        levels = torch.floor(
            self.canonical_level + torch.log2(s / self.canonical_scale) + torch.tensor(self.eps, dtype=s.dtype)
        )
        levels = torch.clamp(levels, min=self.k_min, max=self.k_max)
        return levels.to(torch.int64) - self.k_min

    def __repr__(self) -> str:
        return (
            f"LevelMapper(k_min={self.k_min}, k_max={self.k_max}, canonical_scale={self.canonical_scale}, "
            f"canonical_level={self.canonical_level}, eps={self.eps})"
        )


def _pyramid_levels(scales: Sequence[float]) -> Tuple[int, int]:
    """(k_min, k_max) of power-of-two ``scales`` ``2**-k_min, ..., 2**-k_max`` (one per level, finest first)."""
    levels = []
    for s in scales:
        if not s > 0:
            raise ValueError(f"scales must be positive, got {list(scales)}")
        levels.append(-math.log2(s))
    k_min = round(levels[0])
    expected = [k_min + i for i in range(len(scales))]
    if any(abs(k - e) > 1e-6 for k, e in zip(levels, expected)):
        raise ValueError(
            f"scales of a multi-level pooler must be consecutive powers of two, finest first "
            f"(e.g. [1/4, 1/8, 1/16, 1/32]), got {list(scales)}"
        )
    return k_min, expected[-1]


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign over an FPN pyramid, each RoI read from the level :class:`LevelMapper` assigns it.

    Args:
        output_size: ``oh`` or ``(oh, ow)``.
        scales: spatial scale of each level, finest first (e.g. ``[1/4, 1/8, 1/16, 1/32]``); a
            multi-level pooler needs consecutive powers of two; a single level may use any scale
            and is plain :func:`roi_align`.
        sampling_ratio: samples per bin side, ``<= 0`` adaptive.
        aligned: half-pixel offset (see :func:`roi_align`).
        canonical_scale, canonical_level: FPN eq. 1 constants (224, 4).
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        scales: Sequence[float],
        sampling_ratio: int,
        aligned: bool = False,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        scales = [float(s) for s in scales]
        if len(scales) == 0:
            raise ValueError("scales must name at least one level")
        self.output_size = pair_size(output_size)
        self.scales: List[float] = scales
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        if len(scales) > 1:
            k_min, k_max = _pyramid_levels(scales)
        else:
            if not scales[0] > 0:
                raise ValueError(f"scales must be positive, got {scales}")
            k_min = k_max = round(-math.log2(scales[0]))
        self.map_levels = LevelMapper(k_min, k_max, canonical_scale, canonical_level)

    def forward(self, features: Sequence[Tensor], boxes: RoIs) -> Tensor:
        """features: list of (N, C, H_l, W_l), finest first; boxes: list of N (Ri, 4) or (R, 5) rois.

        Returns (R, C, oh, ow) in the features' dtype, RoIs in the order of ``boxes`` (image-major for
        a list). Zero images (N == 0, ``boxes == []``) or zero boxes give an empty (0, C, oh, ow).
        """
        m = self.map_levels
        # Plain values only: torch.fx records the call as one node (the level assignment depends on the data).
        return multi_level_roi_align(features, boxes, self.output_size, tuple(self.scales), self.sampling_ratio,
                                     self.aligned, (m.k_min, m.k_max, m.canonical_scale, m.canonical_level, m.eps))

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}, map_levels={self.map_levels}"
        )


def multi_level_roi_align(features: Sequence[Tensor], boxes: RoIs, output_size: Tuple[int, int],
                          scales: Tuple[float, ...], sampling_ratio: int, aligned: bool,
                          levels: Tuple[int, int, float, float, float]) -> Tensor:
    """:class:`MultiLevelRoIAlign`'s computation, ``levels`` = its ``LevelMapper``'s ``(k_min, k_max,
    canonical_scale, canonical_level, eps)``. ``torch.fx.wrap``ped: a symbolic trace records it as one call, as
    torchvision's ``MultiScaleRoIAlign`` is one (its feature-extraction tests count on it)."""
    features = list(features)
    if len(features) != len(scales):
        raise ValueError(f"got {len(features)} feature maps for {len(scales)} scales {list(scales)}")
    check_features(features)
    rois = as_roi_tensor(boxes, "boxes", features=features[0])
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, scales[0], sampling_ratio, aligned)
    level = LevelMapper(*levels)(rois[:, 1:])
    # Under torch.jit.trace the per-level loop records one opaque roi_align per level (the single
    # gather builds its plan from data in Python, which a trace would freeze).
    if torch.jit.is_tracing() or _backend.resolve("roi_align") == "torchvision":
        return _per_level(features, rois, level, output_size, scales, sampling_ratio, aligned)
    return _one_gather(features, rois, level, output_size, scales, sampling_ratio, aligned)


def _per_level(features: List[Tensor], rois: Tensor, levels: Tensor, output_size: Tuple[int, int],
               scales: Sequence[float], sampling_ratio: int, aligned: bool) -> Tensor:
    ref = features[0]
    result = ref.new_zeros((rois.shape[0], ref.shape[1]) + tuple(output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        pooled = roi_align(feature, rois[idx], output_size, scale, sampling_ratio, aligned)
        # index_copy_ rather than `result[idx] = ...`, which traces to a view sized for the example.
        result.index_copy_(0, idx, pooled.to(result.dtype))
    return result


def _one_gather(features: List[Tensor], rois: Tensor, levels: Tensor, output_size: Tuple[int, int],
                scales: Sequence[float], sampling_ratio: int, aligned: bool) -> Tensor:
    ref = features[0]
    device = ref.device
    dtype = compute_dtype(ref.dtype)
    rois = rois.detach().to(device=device, dtype=dtype)
    levels = levels.to(device)
    batch = check_batch_index(rois, ref.shape[0], "boxes")
    heights = torch.tensor([f.shape[2] for f in features], device=device)
    widths = torch.tensor([f.shape[3] for f in features], device=device)
    sizes = ref.shape[0] * heights * widths
    level_start = torch.cumsum(sizes, 0) - sizes
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    h, w = heights[levels], widths[levels]
    row_base = level_start[levels] + batch * h * w
    plan = roi_align_plan(rois, scale, h, w, row_base, output_size, sampling_ratio, aligned,
                          int(sizes.sum()))
    return apply_roi_align_plan(features, plan, rois.shape[0], output_size, dtype)


torch.fx.wrap("multi_level_roi_align")
