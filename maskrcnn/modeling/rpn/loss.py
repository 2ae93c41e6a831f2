"""RPN losses: anchors matched to ground truth, 256 sampled per image at up to 50% positives, BCE on objectness
and smooth L1 (beta 1/9) on the deltas of positive anchors, both normalised by the number of sampled anchors
(torchvision's / Detectron's normalisation)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.box_coder import BoxCoder
from ...ops.boxes import box_area, box_iou
from ...ops.losses import smooth_l1_loss
from ...ops.matcher import Matcher
from ...ops.sampler import BalancedPositiveNegativeSampler
from .proposals import flatten_level_outputs

__all__ = ["assign_anchor_labels", "rpn_losses"]


def _ioa(crowd: Tensor, boxes: Tensor) -> Tensor:
    """``(C, B)`` intersection over the area of ``boxes`` (how much of each anchor a crowd region covers)."""
    lt = torch.max(crowd[:, None, :2], boxes[None, :, :2])
    rb = torch.min(crowd[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    return inter / box_area(boxes).clamp(min=1e-6)[None, :]


def assign_anchor_labels(anchors: Tensor, gt_boxes: Tensor, image_size: Tuple[int, int], matcher: Matcher,
                         straddle_thresh: float = -1, crowd_boxes: Optional[Tensor] = None,
                         crowd_thresh: float = 0.7, legacy_plus_one: bool = False) -> Tuple[Tensor, Tensor]:
    """int64 labels for ``(A, 4)`` anchors of one image: 1 positive, 0 negative, -1 ignored; and the matched GT box
    of every anchor (``(A, 4)``; meaningless where the label is not 1).

    An image with no GT makes every anchor negative. ``straddle_thresh >= 0`` ignores anchors reaching more than
    that many pixels outside the image (Detectron); anchors covered by a crowd region more than ``crowd_thresh``
    (intersection over anchor area) are ignored.
    """
    if gt_boxes.numel() == 0:
        labels = torch.zeros(anchors.shape[0], dtype=torch.int64, device=anchors.device)
        matched = torch.zeros_like(anchors)
    else:
        iou = box_iou(gt_boxes, anchors, legacy_plus_one=legacy_plus_one)
        idx = matcher(iou)
        matched = gt_boxes[idx.clamp(min=0)]
        labels = (idx >= 0).to(torch.int64)
        labels[idx == Matcher.BETWEEN_THRESHOLDS] = -1
    if straddle_thresh >= 0:
        h, w = image_size
        outside = ((anchors[:, 0] < -straddle_thresh) | (anchors[:, 1] < -straddle_thresh)
                   | (anchors[:, 2] > w + straddle_thresh) | (anchors[:, 3] > h + straddle_thresh))
        labels[outside] = -1
    if crowd_boxes is not None and crowd_boxes.numel() > 0:
        covered = _ioa(crowd_boxes, anchors).max(dim=0).values > crowd_thresh
        labels[covered & (labels == 0)] = -1
    return labels, matched


def rpn_losses(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
               gt_boxes: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]], matcher: Matcher,
               sampler: BalancedPositiveNegativeSampler, box_coder: BoxCoder, beta: float = 1.0 / 9,
               straddle_thresh: float = -1, crowd_boxes: Optional[Sequence[Optional[Tensor]]] = None,
               crowd_thresh: float = 0.7) -> Dict[str, Tensor]:
    """``{"loss_rpn_cls", "loss_rpn_bbox"}`` for a batch.

    Args:
        objectness, deltas: per level ``(N, A, H, W)`` logits / ``(N, 4A, H, W)`` deltas (with gradients).
        anchors: per level ``(H*W*A, 4)``; gt_boxes: per image ``(G, 4)`` (crowd regions excluded).
        crowd_boxes: per image ``(C, 4)`` regions whose anchors are ignored, or None.
    """
    scores, box_deltas, _ = flatten_level_outputs(objectness, deltas)
    all_anchors = torch.cat(list(anchors), 0)
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    labels, targets = [], []
    for i, (gt, size) in enumerate(zip(gt_boxes, image_sizes)):
        crowd = crowd_boxes[i] if crowd_boxes is not None else None
        lab, matched = assign_anchor_labels(all_anchors, gt.to(all_anchors), size, matcher, straddle_thresh,
                                            crowd, crowd_thresh, legacy)
        labels.append(lab)
        targets.append(box_coder.encode(matched, all_anchors))
    pos, neg = sampler(labels)
    pos_idx = torch.where(torch.cat(pos))[0]
    neg_idx = torch.where(torch.cat(neg))[0]
    sampled = torch.cat([pos_idx, neg_idx])
    scores = scores.reshape(-1)
    box_deltas = box_deltas.reshape(-1, 4)
    labels_all = torch.cat(labels)
    targets_all = torch.cat(targets)
    num = max(sampled.numel(), 1)
    loss_bbox = smooth_l1_loss(box_deltas[pos_idx].float(), targets_all[pos_idx], beta=beta, reduction="sum") / num
    if sampled.numel() == 0:
        loss_cls = scores.sum() * 0.0
    else:
        loss_cls = F.binary_cross_entropy_with_logits(scores[sampled].float(), labels_all[sampled].float())
    return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
