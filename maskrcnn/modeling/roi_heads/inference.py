"""Box inference: from Fast R-CNN outputs to final detections (Detectron's ``box_results_with_nms_and_limit``).

Two steps, each usable alone (the Detectron API in ``maskrcnn/core/test.py`` runs the second one in original-image
pixels, the model in network-input pixels):

1. :func:`class_probs_and_boxes`: softmax over the ``K + 1`` logits; decode the per-class deltas against each RoI
   (or keep the RoI itself when box regression is off); clip to the image.
2. :func:`select_detections`: drop the background column and flatten, so that every (RoI, class) pair is a
   candidate with its own box; keep candidates scoring ``> score_thresh``; drop boxes with a side ``< min_size``;
   NMS per class (``nms_thresh``) and keep the ``detections_per_img`` highest-scoring survivors
   (:func:`~maskrcnn.ops.nms.batched_nms_limited`: the same survivors, found among the top candidates only);
   with box voting (``TEST.BBOX_VOTE``) each survivor is refined by its class's candidates before the limit.

:func:`postprocess_detections` chains them and follows torchvision's ``RoIHeads.postprocess_detections`` step for
step.

Boxes are ``(x1, y1, x2, y2)``; clipping and the minimum size use the box coder's ``legacy_plus_one`` convention.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops.box_coder import BoxCoder
from ...ops.box_voting import BoxVoting
from ...ops.boxes import clip_boxes_to_image, remove_small_boxes
from ...ops.nms import batched_nms, batched_nms_limited

__all__ = ["class_probs_and_boxes", "select_detections", "postprocess_detections"]


def _check_outputs(class_logits: Tensor, box_regression: Tensor, proposals: Sequence[Tensor],
                   image_sizes: Sequence[Tuple[int, int]], cls_agnostic: bool) -> List[int]:
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
    return counts


def class_probs_and_boxes(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    box_coder: BoxCoder,
    cls_agnostic: bool = False,
    bbox_reg: bool = True,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Class probabilities and per-class boxes of every RoI (Detectron's ``im_detect_bbox`` outputs).

    Args:
        class_logits: ``(R, K+1)`` logits of all images' RoIs, concatenated in image order.
        box_regression: ``(R, 4(K+1))`` per-class deltas, or with ``cls_agnostic`` ``(R, 8)`` (Detectron's layout,
            the foreground box in the last 4 columns) or ``(R, 4)``.
        proposals: per image ``(P_i, 4)`` RoIs, ``sum P_i == R``.
        image_sizes: per image ``(height, width)`` the boxes are clipped to.
        box_coder: the Fast R-CNN box coder (weights (10, 10, 5, 5)); its ``legacy_plus_one`` sets the clipping.
        cls_agnostic: one regressed box per RoI, shared by all classes.
        bbox_reg: False ignores ``box_regression``: every class's box is the RoI (``TEST.BBOX_REG``).

    Returns:
        ``(probs, boxes)``: per image ``(P_i, K+1)`` softmax probabilities and ``(P_i, 4(K+1))`` boxes (column
        block ``j`` is class ``j``'s box), in the logits' dtype upcast to at least float32.
    """
    counts = _check_outputs(class_logits, box_regression, proposals, image_sizes, cls_agnostic)
    num_classes = class_logits.shape[1]
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    all_proposals = torch.cat(list(proposals), dim=0) if proposals else box_regression.new_zeros((0, 4))
    if not bbox_reg:
        dtype = torch.promote_types(box_regression.dtype, torch.float32)
        pred_boxes = all_proposals.to(dtype).repeat(1, num_classes)
    elif cls_agnostic:
        pred_boxes = box_coder.decode(box_regression[:, -4:], all_proposals).repeat(1, num_classes)
    else:
        pred_boxes = box_coder.decode(box_regression, all_proposals)
    # Half-precision logits (autocast) are ranked and thresholded in float32.
    pred_scores = F.softmax(class_logits.to(torch.promote_types(class_logits.dtype, torch.float32)), dim=-1)
    boxes = [clip_boxes_to_image(b, tuple(size), legacy_plus_one=legacy)
             for b, size in zip(pred_boxes.split(counts), image_sizes)]
    return list(pred_scores.split(counts)), boxes


def select_detections(
    probs: Tensor,
    boxes: Tensor,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: Optional[float] = 1e-2,
    legacy_plus_one: bool = False,
    class_major: bool = False,
    box_voting: Optional[BoxVoting] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Detections of one image from its RoIs' class probabilities and per-class boxes.

    Args:
        probs: ``(R, K+1)`` class probabilities (column 0 the background, never detected).
        boxes: ``(R, 4(K+1))`` per-class boxes, in any pixel frame (NMS and ``min_size`` act in that frame).
        score_thresh: candidates must score strictly above it (``TEST.SCORE_THRESH``).
        nms_thresh: per-class NMS IoU threshold (``TEST.NMS``).
        detections_per_img: detections kept (``TEST.DETECTIONS_PER_IM``).
        min_size: boxes with a side below it are dropped (torchvision uses 1e-2, which removes empty boxes);
            None keeps every box (Detectron).
        legacy_plus_one: Detectron's ``+1`` widths for ``min_size``.
        class_major: order of equal-scoring candidates, which decides who makes the limit: by RoI, then class
            (False, torchvision's ``postprocess_detections``) or by class, then RoI (True, Detectron's
            ``box_results_with_nms_and_limit``). Saturated scores of an untrained model tie a lot.
        box_voting: refine every NMS survivor with the candidates of its class (Detectron's ``TEST.BBOX_VOTE``,
            applied after NMS and before the limit, which then ranks the voted scores); None: no voting.

    Returns:
        ``(boxes (N, 4), scores (N,), labels (N,) int64 in 1..K)`` sorted by decreasing score, ties in the
        candidate order.
    """
    num_classes = probs.shape[1]
    if boxes.dim() != 2 or boxes.shape != (probs.shape[0], 4 * num_classes):
        raise ValueError(f"boxes must be ({probs.shape[0]}, {4 * num_classes}) to match probs "
                         f"{tuple(probs.shape)}, got {tuple(boxes.shape)}")
    labels = torch.arange(num_classes, device=probs.device).view(1, -1).expand_as(probs)

    # Every (RoI, foreground class) pair competes on its own.
    boxes = boxes.reshape(-1, num_classes, 4)[:, 1:]
    scores, labels = probs[:, 1:], labels[:, 1:]
    if class_major:
        boxes, scores, labels = boxes.transpose(0, 1), scores.t(), labels.t()
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)

    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if min_size is not None:
        keep = remove_small_boxes(boxes, min_size, legacy_plus_one=legacy_plus_one)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

    if box_voting is None or box_voting.keeps_scores:
        # Only the best detections_per_img survivors are kept, so NMS runs on the top-scoring candidates only
        # (voting that keeps the scores cannot change which survivors make the limit).
        keep = batched_nms_limited(boxes, scores, labels, nms_thresh, detections_per_img)
        if box_voting is None:
            return boxes[keep], scores[keep], labels[keep]
        voted_boxes, voted_scores = box_voting(boxes[keep], scores[keep], labels[keep], boxes, scores, labels)
        return voted_boxes, voted_scores, labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)
    voted_boxes, voted_scores = box_voting(boxes[keep], scores[keep], labels[keep], boxes, scores, labels)
    order = torch.sort(voted_scores, descending=True, stable=True).indices[:detections_per_img]
    return voted_boxes[order], voted_scores[order], labels[keep][order]


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
    bbox_reg: bool = True,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Detections of every image: :func:`class_probs_and_boxes` then :func:`select_detections` per image.

    Args: as those two functions; ``image_sizes`` are the network-input sizes (boxes in its pixels).

    Returns:
        ``(boxes, scores, labels)``: per image ``(N_i, 4)`` boxes, ``(N_i,)`` scores and ``(N_i,)`` int64 labels in
        ``1..K``, sorted by decreasing score.
    """
    probs, boxes = class_probs_and_boxes(class_logits, box_regression, proposals, image_sizes, box_coder,
                                         cls_agnostic=cls_agnostic, bbox_reg=bbox_reg)
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    out: Tuple[List[Tensor], List[Tensor], List[Tensor]] = ([], [], [])
    for p, b in zip(probs, boxes):
        for acc, t in zip(out, select_detections(p, b, score_thresh, nms_thresh, detections_per_img,
                                                 min_size=min_size, legacy_plus_one=legacy)):
            acc.append(t)
    return out
