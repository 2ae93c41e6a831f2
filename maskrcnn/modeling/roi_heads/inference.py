"""Box inference: from Fast R-CNN outputs to final detections (Detectron's ``box_results_with_nms_and_limit``).

:func:`postprocess_detections` follows torchvision's ``RoIHeads.postprocess_detections`` step for step:

1. softmax over the ``K + 1`` logits; decode the per-class deltas against each RoI; clip to the image;
2. drop the background column and flatten, so that every (RoI, class) pair is a candidate with its own box;
3. keep candidates scoring ``> score_thresh``; drop boxes with a side ``< min_size``;
4. NMS per class (``nms_thresh``) and keep the ``detections_per_img`` highest-scoring survivors
   (:func:`~maskrcnn.ops.nms.batched_nms_limited`: the same survivors, found among the top candidates only).

Boxes are ``(x1, y1, x2, y2)`` in the pixels of the network input (the resized image); clipping and the minimum size
use the box coder's ``legacy_plus_one`` convention.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.box_coder import BoxCoder
from ...ops.boxes import clip_boxes_to_image, remove_small_boxes
from ...ops.nms import batched_nms_limited

__all__ = ["postprocess_detections"]


def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: float = 1e-2,
    cls_agnostic: bool = False,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Detections of every image.

    Args:
        class_logits: ``(R, K+1)`` logits of all images' RoIs, concatenated in image order.
        box_regression: ``(R, 4(K+1))`` per-class deltas, or with ``cls_agnostic`` ``(R, 8)`` (Detectron's layout,
            the foreground box in the last 4 columns) or ``(R, 4)``.
        proposals: per image ``(P_i, 4)`` RoIs, ``sum P_i == R``.
        image_sizes: per image ``(height, width)`` of the network input, for clipping.
        box_coder: the Fast R-CNN box coder (weights (10, 10, 5, 5)).
        score_thresh: candidates must score strictly above it (``TEST.SCORE_THRESH``).
        nms_thresh: per-class NMS IoU threshold (``TEST.NMS``).
        detections_per_img: detections kept per image (``TEST.DETECTIONS_PER_IM``).
        min_size: boxes with a side below it are dropped (torchvision uses 1e-2, which removes empty boxes).
        cls_agnostic: one regressed box per RoI, shared by all classes.

    Returns:
        ``(boxes, scores, labels)``: per image ``(N_i, 4)`` boxes, ``(N_i,)`` scores and ``(N_i,)`` int64 labels in
        ``1..K``, sorted by decreasing score.
    """
    if isinstance(proposals, Tensor):
        raise TypeError("proposals must be a list of (P_i, 4) tensors, one per image")
    if len(proposals) != len(image_sizes):
        raise ValueError(f"got {len(proposals)} proposal sets for {len(image_sizes)} image sizes")
    if class_logits.dim() != 2:
        raise ValueError(f"class_logits must be (R, K+1), got shape {tuple(class_logits.shape)}")
    num_rois, num_classes = class_logits.shape
    counts = [int(p.shape[0]) for p in proposals]
    if sum(counts) != num_rois:
        raise ValueError(f"class_logits has {num_rois} rows but the proposals hold {sum(counts)} boxes")
    width = box_regression.shape[-1] if box_regression.dim() == 2 else -1
    allowed = (4, 8) if cls_agnostic else (4 * num_classes,)
    if box_regression.dim() != 2 or box_regression.shape[0] != num_rois or width not in allowed:
        raise ValueError(f"box_regression must be ({num_rois}, one of {allowed}) (cls_agnostic={cls_agnostic}), "
                         f"got {tuple(box_regression.shape)}")
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    device = class_logits.device

    all_proposals = torch.cat(list(proposals), dim=0) if proposals else box_regression.new_zeros((0, 4))
    if cls_agnostic:
        fg_boxes = box_coder.decode(box_regression[:, -4:], all_proposals)
        pred_boxes = fg_boxes.repeat(1, num_classes)
    else:
        pred_boxes = box_coder.decode(box_regression, all_proposals)
    pred_scores = F.softmax(class_logits, dim=-1)

    all_boxes: List[Tensor] = []
    all_scores: List[Tensor] = []
    all_labels: List[Tensor] = []
    for boxes, scores, size in zip(pred_boxes.split(counts), pred_scores.split(counts), image_sizes):
        boxes = clip_boxes_to_image(boxes, tuple(size), legacy_plus_one=legacy)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)

        # Every (RoI, foreground class) pair competes on its own.
        boxes = boxes.reshape(-1, num_classes, 4)[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)

        keep = torch.nonzero(scores > score_thresh).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size, legacy_plus_one=legacy)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

        # Only the best detections_per_img survivors are kept, so NMS runs on the top-scoring candidates only.
        keep = batched_nms_limited(boxes, scores, labels, nms_thresh, detections_per_img)
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels
