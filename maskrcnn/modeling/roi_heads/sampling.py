"""Training-time selection of the RoIs the box head learns from (Fast R-CNN minibatch sampling).

Per image, with the semantics of torchvision's ``RoIHeads.select_training_samples`` (which follow Detectron):

1. the ground-truth boxes are appended to the proposals, so every object has at least one perfect RoI;
2. every RoI is matched to the ground truth of highest IoU by a :class:`~maskrcnn.ops.matcher.Matcher`
   (``TRAIN.FG_THRESH``, ``TRAIN.BG_THRESH_HI``, no low-quality matches): IoU ``>= FG_THRESH`` takes that
   object's label, IoU ``< BG_THRESH_HI`` is background (label 0), anything between is ignored (-1);
3. Detectron extras, both off by default: ``bg_thresh_lo > 0`` ignores background RoIs with IoU below it, and
   proposals whose intersection-over-their-own-area with a crowd region exceeds ``crowd_thresh`` are ignored
   (Detectron's crowd filter; the appended ground truth is never filtered);
4. a :class:`~maskrcnn.ops.sampler.BalancedPositiveNegativeSampler` draws at most ``BATCH_SIZE_PER_IM`` RoIs
   with at most ``FG_FRACTION`` of them foreground; the sampled RoIs keep their original (increasing) order;
5. the regression target of each sampled RoI is its matched box encoded by the Fast R-CNN box coder.

An image without ground truth gives only background RoIs; their regression targets are zeros (torchvision encodes
them against a zero-area box, which gives ``-inf``; they are never used by the loss either way).

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. IoUs use the box coder's ``legacy_plus_one`` convention.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...ops.box_coder import BoxCoder
from ...ops.boxes import box_area, box_iou
from ...ops.matcher import Matcher
from ...ops.sampler import BalancedPositiveNegativeSampler

__all__ = ["SampledRoIs", "sample_rois", "label_proposals"]


class SampledRoIs(NamedTuple):
    """The sampled RoIs of a batch, one entry per image.

    rois: ``(S_i, 4)`` boxes in the proposals' dtype. labels: ``(S_i,)`` int64, 0 background, 1..K object classes.
    regression_targets: ``(S_i, 4)`` encoded deltas (meaningful for foreground rows only).
    matched_idxs: ``(S_i,)`` int64 index of the matched ground truth (0 for background rows, as torchvision).
    """

    rois: List[Tensor]
    labels: List[Tensor]
    regression_targets: List[Tensor]
    matched_idxs: List[Tensor]


def _check_boxes(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != 4:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an (N, 4) tensor, got {shape}")


def label_proposals(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    matcher: Matcher,
    crowd_boxes: Optional[Tensor] = None,
    crowd_thresh: float = 0.7,
    bg_thresh_lo: float = 0.0,
    num_proposals_crowd_checked: Optional[int] = None,
    legacy_plus_one: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Labels of the RoIs of one image, before sampling.

    Args:
        proposals: ``(P, 4)`` RoIs (ground truth already appended, if wanted).
        gt_boxes: ``(G, 4)``; gt_labels: ``(G,)`` integer classes in 1..K.
        matcher: IoU matcher (``-1`` below its low threshold, ``-2`` between thresholds).
        crowd_boxes: ``(C, 4)`` crowd regions or None.
        crowd_thresh: a proposal covered by a crowd region for more than this fraction of its area is ignored.
        bg_thresh_lo: background RoIs (IoU below the matcher's low threshold) with IoU ``< bg_thresh_lo`` are
            ignored; 0 keeps them all. Not applied to images without ground truth.
        num_proposals_crowd_checked: only the first this many proposals are crowd-filtered (default all).
        legacy_plus_one: Detectron's ``+1`` box widths for IoU and area.

    Returns:
        ``(labels (P,) int64 with -1 ignored, matched_idxs (P,) int64 clamped to >= 0)``.
    """
    num = proposals.shape[0]
    device = proposals.device
    if gt_boxes.shape[0] == 0:
        matched = torch.zeros((num,), dtype=torch.int64, device=device)
        labels = torch.zeros((num,), dtype=torch.int64, device=device)
    else:
        iou = box_iou(gt_boxes, proposals, legacy_plus_one=legacy_plus_one)
        raw = matcher(iou)
        matched = raw.clamp(min=0)
        labels = gt_labels.to(device=device, dtype=torch.int64)[matched]
        labels[raw == matcher.BELOW_LOW_THRESHOLD] = 0
        labels[raw == matcher.BETWEEN_THRESHOLDS] = -1
        if bg_thresh_lo > 0:
            # Detectron samples background only from [BG_THRESH_LO, BG_THRESH_HI): easier negatives are skipped.
            too_easy = (raw == matcher.BELOW_LOW_THRESHOLD) & (iou.max(dim=0).values < bg_thresh_lo)
            labels[too_easy] = -1
    if crowd_boxes is not None and crowd_boxes.shape[0] > 0 and num > 0:
        checked = num if num_proposals_crowd_checked is None else int(num_proposals_crowd_checked)
        props = proposals[:checked]
        crowd = crowd_boxes.to(device=device, dtype=proposals.dtype)
        # Intersection over the proposal's own area (COCO's iscrowd IoU): a RoI lying inside a crowd region is
        # ambiguous as a negative, however small it is relative to the region.
        offset = 1.0 if legacy_plus_one else 0.0
        top_left = torch.maximum(props[:, None, :2], crowd[None, :, :2])
        bottom_right = torch.minimum(props[:, None, 2:], crowd[None, :, 2:])
        extent = (bottom_right - top_left + offset).clamp(min=0)
        inter = extent[..., 0] * extent[..., 1]
        area_p = box_area(props, legacy_plus_one=legacy_plus_one)[:, None]
        ioa = inter / area_p
        in_crowd = (ioa > crowd_thresh).any(dim=1)
        labels[:checked][in_crowd] = -1
    return labels, matched


def sample_rois(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    matcher: Matcher,
    sampler: BalancedPositiveNegativeSampler,
    box_coder: BoxCoder,
    crowd_boxes: Optional[Sequence[Optional[Tensor]]] = None,
    crowd_thresh: float = 0.7,
    bg_thresh_lo: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> SampledRoIs:
    """Sample the box head's training RoIs of every image (see the module docstring).

    Args:
        proposals: per image ``(P_i, 4)`` float boxes (e.g. the RPN's output).
        gt_boxes: per image ``(G_i, 4)`` ground-truth boxes (no crowd regions); cast to the proposals' dtype.
        gt_labels: per image ``(G_i,)`` integer classes in 1..K.
        matcher: ``Matcher(TRAIN.FG_THRESH, TRAIN.BG_THRESH_HI, allow_low_quality_matches=False)``.
        sampler: ``BalancedPositiveNegativeSampler(TRAIN.BATCH_SIZE_PER_IM, TRAIN.FG_FRACTION)``.
        box_coder: the Fast R-CNN coder (weights ``MODEL.BBOX_REG_WEIGHTS``, usually (10, 10, 5, 5)); its
            ``legacy_plus_one`` also selects the IoU convention.
        crowd_boxes: optional per image ``(C_i, 4)`` crowd regions (``iscrowd == 1``), or None entries.
        crowd_thresh: ``TRAIN.CROWD_FILTER_THRESH``.
        bg_thresh_lo: ``TRAIN.BG_THRESH_LO``.
        generator: optional RNG for the sampler's draws (default: the global RNG, drawn in torchvision's order).

    Returns:
        :class:`SampledRoIs`.
    """
    for name, seq in (("proposals", proposals), ("gt_boxes", gt_boxes), ("gt_labels", gt_labels)):
        if isinstance(seq, Tensor):
            raise TypeError(f"sample_rois: {name} must be a list with one tensor per image, not a Tensor")
    if not (len(proposals) == len(gt_boxes) == len(gt_labels)):
        raise ValueError(
            f"sample_rois: proposals, gt_boxes and gt_labels must have one entry per image, got "
            f"{len(proposals)}, {len(gt_boxes)} and {len(gt_labels)}"
        )
    if crowd_boxes is not None and len(crowd_boxes) != len(proposals):
        raise ValueError(f"sample_rois: crowd_boxes has {len(crowd_boxes)} entries for {len(proposals)} images")
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))

    all_rois: List[Tensor] = []
    all_labels: List[Tensor] = []
    all_matched: List[Tensor] = []
    gts: List[Tensor] = []
    for i, (props, gt, gl) in enumerate(zip(proposals, gt_boxes, gt_labels)):
        _check_boxes(props, f"proposals[{i}]")
        _check_boxes(gt, f"gt_boxes[{i}]")
        if gl.dim() != 1 or gl.shape[0] != gt.shape[0]:
            raise ValueError(f"gt_labels[{i}] must be ({gt.shape[0]},), got shape {tuple(gl.shape)}")
        gt = gt.to(device=props.device, dtype=props.dtype)
        rois = torch.cat((props, gt), dim=0)
        crowd = None if crowd_boxes is None else crowd_boxes[i]
        if crowd is not None:
            _check_boxes(crowd, f"crowd_boxes[{i}]")
        labels, matched = label_proposals(
            rois, gt, gl, matcher, crowd_boxes=crowd, crowd_thresh=crowd_thresh, bg_thresh_lo=bg_thresh_lo,
            num_proposals_crowd_checked=props.shape[0], legacy_plus_one=legacy,
        )
        all_rois.append(rois)
        all_labels.append(labels)
        all_matched.append(matched)
        gts.append(gt)

    if generator is None:
        pos, neg = sampler(all_labels)
    else:
        pos, neg = sampler(all_labels, generator=generator)

    out = SampledRoIs([], [], [], [])
    for rois, labels, matched, gt, p, n in zip(all_rois, all_labels, all_matched, gts, pos, neg):
        keep = torch.nonzero(p | n).squeeze(1)
        rois, labels, matched = rois[keep], labels[keep], matched[keep]
        if gt.shape[0] == 0:
            targets = torch.zeros_like(rois)
        else:
            targets = box_coder.encode(gt[matched], rois).to(rois.dtype)
        out.rois.append(rois)
        out.labels.append(labels)
        out.regression_targets.append(targets)
        out.matched_idxs.append(matched)
    return out
