"""RPN losses with torchvision's or Detectron's normalisation, plus Detectron's anchor filters.

Every anchor is matched to the ground truth (``Matcher(0.7, 0.3, allow_low_quality_matches=True)``): label 1
(foreground), 0 (background) or -1 (ignored). A balanced sample per image (256 anchors, at most half positive)
then gives the objectness loss, binary cross-entropy over the sample, and the box loss, smooth L1
(``beta = 1/9``) over the sampled positives. The two rules differ only in the divisors (``S_i`` sampled anchors in
image ``i`` of ``N``, ``B`` = the sampler's ``batch_size_per_image``):

* ``"torchvision"`` (``rpn.py``'s ``compute_loss``): objectness ``sum / sum_i S_i`` (the mean over the sample),
  box ``sum / sum_i S_i``.
* ``"detectron"`` (Detectron / Detectron.pytorch): objectness ``sum / (B * N)`` on a multi-level (FPN) RPN
  (``FPN.fpn_rpn_losses``) and the mean over the sample on a single-level one (``single_scale_rpn_losses``); box
  ``(1 / N) * sum_i (box sum of image i) / S_i`` (``roi_data/rpn.py`` weights each positive by ``1 / S_i``, the
  smooth L1 divides by the images).

They agree whenever every image fills its sample (``S_i = B``); they differ when an image has fewer labelled anchors
than ``B`` (few anchors, or most of them ignored by the straddle and crowd filters).

Beyond torchvision: an image without ground truth makes every anchor a negative; ``straddle_thresh >= 0``
ignores anchors reaching more than that many pixels outside the image and keeps them out of the matching
(Detectron's ``RPN_STRADDLE_THRESH``); anchors lying inside a crowd region for more than ``crowd_thresh`` of
their area are ignored (Detectron's crowd filter). Degenerate (empty) ground-truth boxes are not matched: they
would tie at IoU 0 with every anchor and turn all of them positive.
"""
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

__all__ = ["LOSS_NORMALIZATIONS", "assign_anchor_labels", "rpn_losses"]

#: Accepted values of ``rpn_losses(normalization=...)`` (config key ``RPN.LOSS_NORMALIZATION``).
LOSS_NORMALIZATIONS = ("torchvision", "detectron")


def _intersection_over_anchor(crowd: Tensor, anchors: Tensor, legacy_plus_one: bool) -> Tensor:
    """``(C, A)`` intersection of crowd region and anchor over the anchor's area."""
    offset = 1.0 if legacy_plus_one else 0.0
    top_left = torch.maximum(crowd[:, None, :2], anchors[None, :, :2])
    bottom_right = torch.minimum(crowd[:, None, 2:], anchors[None, :, 2:])
    extent = (bottom_right - top_left + offset).clamp(min=0)
    inter = extent[..., 0] * extent[..., 1]
    return inter / box_area(anchors, legacy_plus_one=legacy_plus_one).clamp(min=1e-6)[None, :]


def assign_anchor_labels(anchors: Tensor, gt_boxes: Tensor, image_size: Tuple[int, int], matcher: Matcher,
                         straddle_thresh: float = -1, crowd_boxes: Optional[Tensor] = None,
                         crowd_thresh: float = 0.7, legacy_plus_one: bool = False) -> Tuple[Tensor, Tensor]:
    """Labels of the ``(A, 4)`` anchors of one image.

    Args:
        anchors: ``(A, 4)`` xyxy anchors; gt_boxes: ``(G, 4)`` (no crowd regions), cast to the anchors' dtype.
        image_size: ``(h, w)`` of the image (for ``straddle_thresh``).
        matcher: e.g. ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.
        straddle_thresh: ``>= 0`` ignores anchors extending more than this beyond the image; -1 keeps all.
        crowd_boxes: ``(C, 4)`` crowd regions or None; crowd_thresh: the intersection-over-anchor-area above
            which an anchor is ignored.
        legacy_plus_one: Detectron's inclusive widths for IoU, areas and the border test.

    Returns:
        ``labels`` ``(A,)`` int64: 1 foreground, 0 background, -1 ignored; ``matched`` ``(A,)`` int64 index into the
        non-degenerate rows of ``gt_boxes`` (see :func:`_valid_gt`); meaningful where the label is 1.
    """
    num = anchors.shape[0]
    device = anchors.device
    gt = _valid_gt(gt_boxes.to(device=device, dtype=anchors.dtype), legacy_plus_one)
    inside = None
    if straddle_thresh >= 0:
        h, w = float(image_size[0]), float(image_size[1])
        t = float(straddle_thresh)
        if legacy_plus_one:  # inclusive coordinates: the last pixel is w - 1 (Detectron's `x2 < w + t`)
            far_ok = (anchors[:, 2] < w + t) & (anchors[:, 3] < h + t)
        else:
            far_ok = (anchors[:, 2] <= w + t) & (anchors[:, 3] <= h + t)
        inside = (anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & far_ok
    if gt.shape[0] == 0:
        labels = torch.zeros(num, dtype=torch.int64, device=device)
        matched = torch.zeros(num, dtype=torch.int64, device=device)
    else:
        iou = box_iou(gt, anchors, legacy_plus_one=legacy_plus_one)
        if inside is not None:
            # Outside anchors take no part in the matching, so a ground truth's "best anchor" is an inside one.
            iou = iou.masked_fill(~inside[None, :], -1.0)
        idx = matcher(iou)
        labels = (idx >= 0).to(torch.int64)
        labels[idx == Matcher.BETWEEN_THRESHOLDS] = -1
        matched = idx.clamp(min=0)
    if inside is not None:
        labels[~inside] = -1
    if crowd_boxes is not None and crowd_boxes.numel() > 0:
        crowd = crowd_boxes.to(device=device, dtype=anchors.dtype).reshape(-1, 4)
        covered = (_intersection_over_anchor(crowd, anchors, legacy_plus_one) > crowd_thresh).any(dim=0)
        labels[covered] = -1
    return labels, matched


def _valid_gt(gt_boxes: Tensor, legacy_plus_one: bool) -> Tensor:
    """The rows of ``gt_boxes`` ``(G, 4)`` with a positive width and height."""
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        if gt_boxes.numel() == 0:
            return gt_boxes.reshape(0, 4)
        raise ValueError(f"gt boxes must be (G, 4), got shape {tuple(gt_boxes.shape)}")
    offset = 1.0 if legacy_plus_one else 0.0
    ok = (gt_boxes[:, 2] - gt_boxes[:, 0] + offset > 0) & (gt_boxes[:, 3] - gt_boxes[:, 1] + offset > 0)
    return gt_boxes if bool(ok.all()) else gt_boxes[ok]


def rpn_losses(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
               gt_boxes: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]], matcher: Matcher,
               sampler: BalancedPositiveNegativeSampler, box_coder: BoxCoder, beta: float = 1.0 / 9,
               straddle_thresh: float = -1, crowd_boxes: Optional[Sequence[Optional[Tensor]]] = None,
               crowd_thresh: float = 0.7, generator: Optional[torch.Generator] = None,
               normalization: str = "torchvision") -> Dict[str, Tensor]:
    """``{"loss_rpn_cls", "loss_rpn_bbox"}`` of a batch (0-d float32 tensors).

    Args:
        objectness: per level ``(N, A, H, W)`` logits; deltas: per level ``(N, 4A, H, W)`` (with gradients).
        anchors: per level ``(H*W*A, 4)``, shared by all images.
        gt_boxes: per image ``(G_i, 4)`` ground truth (crowd regions excluded); ``G_i = 0`` is allowed.
        image_sizes: ``(h, w)`` per image (for ``straddle_thresh``).
        matcher, sampler, box_coder: anchor matching, the balanced sample, target encoding; the box coder's
            ``legacy_plus_one`` also selects the IoU convention.
        beta: smooth L1 transition point.
        straddle_thresh, crowd_boxes (per image ``(C_i, 4)`` or None), crowd_thresh: see :func:`assign_anchor_labels`.
        generator: optional RNG for the sampler (default: the global RNG, drawn in torchvision's order).
        normalization: ``"torchvision"`` or ``"detectron"``, the divisors of the two losses (module docstring);
            Detectron's fixed objectness divisor is ``sampler.batch_size_per_image`` times the number of images.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")
    scores, box_deltas, counts = flatten_level_outputs(objectness, deltas)
    if isinstance(anchors, Tensor):
        anchors = [anchors]
    if len(anchors) != len(counts) or any(a.shape != (n, 4) for a, n in zip(anchors, counts)):
        raise ValueError(f"anchors must hold (H*W*A, 4) = {[(n, 4) for n in counts]} per level, got "
                         f"{[tuple(a.shape) for a in anchors]}")
    num_images = scores.shape[0]
    for name, seq in (("gt_boxes", gt_boxes), ("image_sizes", image_sizes)):
        if len(seq) != num_images:
            raise ValueError(f"{name} has {len(seq)} entries for a batch of {num_images} images")
    if crowd_boxes is not None and len(crowd_boxes) != num_images:
        raise ValueError(f"crowd_boxes has {len(crowd_boxes)} entries for a batch of {num_images} images")
    all_anchors = torch.cat(list(anchors), 0).to(scores.device)
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))

    labels: List[Tensor] = []
    matched: List[Tensor] = []
    valid_gt: List[Tensor] = []
    for i in range(num_images):
        crowd = crowd_boxes[i] if crowd_boxes is not None else None
        lab, idx = assign_anchor_labels(all_anchors, gt_boxes[i], image_sizes[i], matcher, straddle_thresh, crowd,
                                        crowd_thresh, legacy)
        labels.append(lab)
        matched.append(idx)
        valid_gt.append(_valid_gt(gt_boxes[i].to(all_anchors), legacy))
    pos_masks, neg_masks = sampler(labels) if generator is None else sampler(labels, generator=generator)

    # Regression targets for the sampled positives only (torchvision encodes every anchor, then indexes).
    targets = [box_coder.encode(gt[idx[p]], all_anchors[p]) for gt, idx, p in zip(valid_gt, matched, pos_masks)]
    pos_idx = torch.where(torch.cat(pos_masks))[0]
    neg_idx = torch.where(torch.cat(neg_masks))[0]
    sampled = torch.cat([pos_idx, neg_idx])
    flat_scores = scores.reshape(-1)
    flat_deltas = box_deltas.reshape(-1, 4)
    if sampled.numel() == 0:
        # Every anchor ignored: no signal, but keep the graph (and DDP's used parameters) intact.
        zero = flat_scores.float().sum() * 0.0 + flat_deltas.float().sum() * 0.0
        return {"loss_rpn_cls": zero, "loss_rpn_bbox": zero.clone()}
    target_labels = torch.cat(labels)[sampled].to(torch.float32)
    if normalization == "torchvision":  # torchvision's exact operations (bit-identical losses)
        loss_cls = F.binary_cross_entropy_with_logits(flat_scores[sampled].float(), target_labels)
        loss_bbox = smooth_l1_loss(flat_deltas[pos_idx].float(), torch.cat(targets).float(), beta=beta,
                                   reduction="sum") / sampled.numel()
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
    cls_sum = F.binary_cross_entropy_with_logits(flat_scores[sampled].float(), target_labels, reduction="sum")
    box_elems = smooth_l1_loss(flat_deltas[pos_idx].float(), torch.cat(targets).float(), beta=beta, reduction="none")
    # Detectron: each positive weighs 1 / (its image's sample size), then the mean over the images.
    per_image_sampled = torch.stack([(p | n).sum() for p, n in zip(pos_masks, neg_masks)]).to(box_elems.device)
    num_anchors = all_anchors.shape[0]
    pos_image = torch.div(pos_idx, num_anchors, rounding_mode="floor")
    weights = 1.0 / per_image_sampled[pos_image].to(torch.float32)
    loss_bbox = (box_elems.sum(dim=1) * weights).sum() / num_images
    multi_level = len(counts) > 1
    cls_divisor = sampler.batch_size_per_image * num_images if multi_level else sampled.numel()
    return {"loss_rpn_cls": cls_sum / cls_divisor, "loss_rpn_bbox": loss_bbox}
