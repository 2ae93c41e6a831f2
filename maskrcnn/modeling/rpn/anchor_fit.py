"""Anchor fitting: how well an FPN anchor set covers a dataset's ground-truth boxes, and the set that covers it best.

The RPN can only learn to propose a box well if some anchor overlaps it: a box whose best anchor IoU is low gets
only "low-quality" matches and a weak, late signal. The quality measure here is exact for the anchors the model
builds (:func:`~maskrcnn.modeling.rpn.anchors.torchvision_cell_anchors` shifted by ``(x * stride, y * stride)``):
for every box, the best IoU over all levels, cell anchors and grid positions. The best position of a cell anchor is
the grid point nearest the box centre in x and in y separately (an axis-aligned overlap shrinks with either offset),
so each box costs ``levels x anchors`` IoUs, not a full grid.

* :func:`best_anchor_iou` — per-box best IoU for one anchor set;
* :func:`anchor_quality` — recall (fraction of boxes whose best IoU reaches ``iou``) and mean best IoU;
* :func:`fit_fpn_anchors` — search ``FPN.RPN_ANCHOR_START_SIZE`` and ``FPN.RPN_ASPECT_RATIOS`` candidates (sizes
  double per level, as :meth:`AnchorGenerator.from_cfg` builds them) for the best recall, then mean IoU, with a
  small preference for fewer ratios (each ratio is one more anchor per location to score and sort).

Boxes are ``(N, 4)`` ``x1, y1, x2, y2`` in network-input pixels (after the resize), continuous convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .anchors import torchvision_cell_anchors

__all__ = ["AnchorQuality", "AnchorFit", "best_anchor_iou", "anchor_quality", "candidate_ratio_sets",
           "fit_fpn_anchors", "fpn_anchor_levels"]

#: Start sizes tried (anchor side at the finest level, input pixels).
START_SIZES: Tuple[int, ...] = (4, 6, 8, 12, 16, 24, 32, 48, 64)
#: Tie-break: a ratio set must beat one with fewer ratios by more than this much recall + mean IoU / 2.
RATIO_COST = 0.004


@dataclass(frozen=True)
class AnchorQuality:
    recall: float      # fraction of boxes with best anchor IoU >= iou
    mean_iou: float    # mean best anchor IoU
    iou: float         # the threshold recall counts at

    def __str__(self) -> str:
        return f"recall@{self.iou:g} {100 * self.recall:.1f}%, mean best IoU {self.mean_iou:.3f}"


@dataclass(frozen=True)
class AnchorFit:
    start_size: int
    ratios: Tuple[float, ...]
    quality: AnchorQuality
    tried: int


def fpn_anchor_levels(start_size: float, min_level: int = 2, max_level: int = 6
                      ) -> Tuple[List[float], List[int]]:
    """``(sizes, strides)`` of FPN levels ``min_level..max_level``: size ``start * 2**(l - min)``, stride ``2**l``."""
    levels = range(int(min_level), int(max_level) + 1)
    return [float(start_size) * 2.0 ** (lvl - min_level) for lvl in levels], [2 ** lvl for lvl in levels]


def best_anchor_iou(boxes: np.ndarray, image_hw: np.ndarray, sizes: Sequence[float], strides: Sequence[int],
                    ratios: Sequence[float]) -> np.ndarray:
    """``(N,)`` best IoU of each box with any anchor (one size per level, ``ratios`` at every level).

    Args:
        boxes: ``(N, 4)`` boxes in input pixels.
        image_hw: ``(N, 2)`` (padded) input size of each box's image; the grid of a level covers
            ``ceil(side / stride)`` cells.
        sizes, strides: per level.
        ratios: aspect ratios ``h / w``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    image_hw = np.asarray(image_hw, dtype=np.float64).reshape(-1, 2)
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = np.zeros(len(boxes), dtype=np.float64)
    for size, stride in zip(sizes, strides):
        cells = torchvision_cell_anchors([size], list(ratios)).double().numpy()  # (A, 4), zero-centred
        fw = np.ceil(image_hw[:, 1] / stride)
        fh = np.ceil(image_hw[:, 0] / stride)
        for a in cells:
            acx, acy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            kx = np.clip(np.round((cx - acx) / stride), 0, fw - 1)
            ky = np.clip(np.round((cy - acy) / stride), 0, fh - 1)
            x1, y1 = a[0] + kx * stride, a[1] + ky * stride
            x2, y2 = a[2] + kx * stride, a[3] + ky * stride
            iw = np.clip(np.minimum(x2, boxes[:, 2]) - np.maximum(x1, boxes[:, 0]), 0, None)
            ih = np.clip(np.minimum(y2, boxes[:, 3]) - np.maximum(y1, boxes[:, 1]), 0, None)
            inter = iw * ih
            iou = inter / (area + (a[2] - a[0]) * (a[3] - a[1]) - inter)
            np.maximum(best, iou, out=best)
    return best


def anchor_quality(boxes: np.ndarray, image_hw: np.ndarray, start_size: float, ratios: Sequence[float],
                   iou: float = 0.5, min_level: int = 2, max_level: int = 6) -> AnchorQuality:
    """Recall and mean best IoU of the FPN anchor set ``(start_size, ratios)`` on ``boxes``."""
    sizes, strides = fpn_anchor_levels(start_size, min_level, max_level)
    best = best_anchor_iou(boxes, image_hw, sizes, strides, ratios)
    if len(best) == 0:
        return AnchorQuality(0.0, 0.0, float(iou))
    return AnchorQuality(float((best >= iou).mean()), float(best.mean()), float(iou))


def _nice_ratio(r: float) -> float:
    return float(np.round(r, 2)) if r < 1 else float(np.round(r, 1))


def candidate_ratio_sets(aspect_ratios: np.ndarray) -> List[Tuple[float, ...]]:
    """Ratio sets to try: the usual ones, plus sets at quantiles of the data's own ``h / w`` distribution (in log
    space, so 1:3 and 3:1 weigh alike)."""
    sets = [(1.0,), (0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0, 4.0), (0.33, 1.0, 3.0)]
    logs = np.log(np.asarray(aspect_ratios, dtype=np.float64))
    if len(logs):
        for qs in ((50,), (20, 80), (10, 50, 90), (5, 27.5, 50, 72.5, 95)):
            vals = tuple(sorted({_nice_ratio(float(np.exp(v))) for v in np.percentile(logs, qs)}))
            if vals and all(v > 0 for v in vals):
                sets.append(vals)
    unique: List[Tuple[float, ...]] = []
    for s in sets:
        if s not in unique:
            unique.append(s)
    return unique


def fit_fpn_anchors(boxes: np.ndarray, image_hw: np.ndarray, iou: float = 0.5, min_level: int = 2,
                    max_level: int = 6, start_sizes: Sequence[int] = START_SIZES,
                    ratio_sets: Optional[Sequence[Sequence[float]]] = None) -> AnchorFit:
    """The FPN anchor set (start size, ratios) with the best ``recall + mean_iou / 2 - RATIO_COST * len(ratios)``.

    Args:
        boxes: ``(N, 4)`` ground-truth boxes in input pixels; image_hw: ``(N, 2)`` their images' input sizes.
        iou: the IoU a box's best anchor must reach to count as recalled.
        start_sizes: candidates for ``FPN.RPN_ANCHOR_START_SIZE``.
        ratio_sets: candidates for ``FPN.RPN_ASPECT_RATIOS`` (default :func:`candidate_ratio_sets` of the boxes).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("fit_fpn_anchors: no boxes to fit anchors to")
    if ratio_sets is None:
        ratio_sets = candidate_ratio_sets((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]))
    best: Optional[AnchorFit] = None
    best_score = -np.inf
    tried = 0
    for ratios in ratio_sets:
        for start in start_sizes:
            q = anchor_quality(boxes, image_hw, start, ratios, iou, min_level, max_level)
            tried += 1
            score = q.recall + q.mean_iou / 2 - RATIO_COST * len(ratios)
            if score > best_score + 1e-12:
                best_score = score
                best = AnchorFit(int(start), tuple(float(r) for r in ratios), q, 0)
    assert best is not None
    return AnchorFit(best.start_size, best.ratios, best.quality, tried)
