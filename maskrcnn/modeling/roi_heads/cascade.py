"""``CascadeROIHeads``: Cascade R-CNN's box stages (detectron2's ``CascadeROIHeads``) in front of the mask and
keypoint branches of :class:`~maskrcnn.modeling.roi_heads.roi_heads.ROIHeads`.

Stage ``k`` (``k = 0 .. S-1``) has its own ``Box_Head[k]`` / ``Box_Outs[k]`` (class-agnostic box regression) and its
own box coder (``CASCADE_RCNN.BBOX_REG_WEIGHTS[k]``) and IoU threshold (``CASCADE_RCNN.IOUS[k]``):

- training: stage 0 samples the RPN's proposals (ground truth appended) exactly as the plain heads do, at
  ``TRAIN.FG_THRESH`` (which must equal ``IOUS[0]``). Stage ``k + 1`` takes stage ``k``'s regressed boxes of those
  RoIs (detached, clipped to the image, empty ones dropped) and labels *all* of them with its own threshold
  (foreground at IoU >= ``IOUS[k + 1]``, background below; no resampling, no low-quality matches), as detectron2.
  Each stage's losses are ``loss_cls_stage{k}`` / ``loss_bbox_stage{k}`` times ``CASCADE_RCNN.STAGE_WEIGHTS[k]``;
  the gradient each stage sends into the shared features is scaled by ``1 / S``. The mask and keypoint losses use
  stage 0's sampled RoIs (detectron2: the mask head trains on the proposals the cascade started from).
- inference: the stages run in sequence, each on the previous stage's regressed (clipped) boxes; a RoI's class
  probabilities are the mean of the ``S`` stages' softmax outputs and its box is the last stage's regression, for
  every class; score threshold, NMS and the mask / keypoint heads on the final detections are the plain path's.

The stages' modules are ``nn.ModuleList`` s under the Detectron names: ``Box_Head.{k}.*`` and ``Box_Outs.{k}.*``
(detectron2's ``roi_heads.box_head.{k}`` / ``roi_heads.box_predictor.{k}``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.boxes import box_iou, clip_boxes_to_image
from ...ops.matcher import Matcher
from .box_head import BlobConv, build_box_head
from .box_outputs import FastRCNNOutputs, fast_rcnn_losses
from .inference import class_probs_and_boxes
from .roi_heads import ROIHeads

__all__ = ["CascadeROIHeads", "scale_gradient"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""
    return _ScaleGradient.apply(x, float(scale))


def _scaled_features(features: BlobConv, scale: float) -> BlobConv:
    # Scaling the feature maps' gradient equals detectron2's scaling of the pooled features' (pooling is linear).
    if isinstance(features, Tensor):
        return scale_gradient(features, scale)
    return [scale_gradient(f, scale) for f in features]


class CascadeROIHeads(ROIHeads):
    """Cascade R-CNN RoI heads.

    Args:
        box_heads: one box head per stage (``forward(features, rois) -> (R, D)``, FPN heads; not the C4 res5 head).
        box_outs: one :class:`FastRCNNOutputs` per stage, with class-agnostic regression.
        box_coders: one box coder per stage (``CASCADE_RCNN.BBOX_REG_WEIGHTS``).
        ious: per stage the IoU threshold of its foreground (``CASCADE_RCNN.IOUS``); ``ious[0]`` is the threshold
            of the ``proposal_matcher`` (``TRAIN.FG_THRESH``).
        stage_loss_weights: factor on each stage's losses (``CASCADE_RCNN.STAGE_WEIGHTS``; detectron2: all 1).
        **kwargs: the :class:`ROIHeads` keywords (sampling, test settings, mask and keypoint branches), except
            ``box_coder``.
    """

    def __init__(self, box_heads: Sequence[nn.Module], box_outs: Sequence[nn.Module], *,
                 box_coders: Sequence[BoxCoder], ious: Sequence[float],
                 stage_loss_weights: Optional[Sequence[float]] = None, **kwargs):
        num = len(box_heads)
        if num < 1:
            raise ValueError("a cascade needs at least one stage")
        stage_loss_weights = [1.0] * num if stage_loss_weights is None else [float(w) for w in stage_loss_weights]
        if not (len(box_outs) == len(box_coders) == len(ious) == len(stage_loss_weights) == num):
            raise ValueError(f"one box head, box outputs, box coder, IoU and loss weight per stage: got "
                             f"{len(box_heads)}, {len(box_outs)}, {len(box_coders)}, {len(ious)}, "
                             f"{len(stage_loss_weights)}")
        for k, outs in enumerate(box_outs):
            if not getattr(outs, "cls_agnostic_bbox_reg", False):
                raise ValueError(f"box_outs[{k}] must regress class-agnostic boxes (MODEL.CLS_AGNOSTIC_BBOX_REG True): "
                                 f"each stage's box is the next stage's RoI, whatever the class")
        for k, head in enumerate(box_heads):
            if getattr(head, "shares_res5", False) or type(head).__name__ == "ResNetRoIConv5Head":
                raise ValueError(f"box_heads[{k}] is a C4 res5 head: the cascade runs FPN box heads (detectron2's)")
        if "box_coder" in kwargs:
            raise TypeError("CascadeROIHeads takes box_coders= (one per stage) instead of box_coder=")
        super().__init__(box_heads[0], box_outs[0], box_coder=box_coders[0], **kwargs)
        self.Box_Head = nn.ModuleList(box_heads)
        self.Box_Outs = nn.ModuleList(box_outs)
        self.box_coders = list(box_coders)
        self.ious = [float(v) for v in ious]
        self.stage_loss_weights = stage_loss_weights
        self.stage_matchers = [Matcher(v, v, allow_low_quality_matches=False) for v in self.ious]

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float], **parts) -> "CascadeROIHeads":
        """The plain heads' keys (see :meth:`ROIHeads.from_cfg`) plus ``CASCADE_RCNN.{IOUS, BBOX_REG_WEIGHTS,
        STAGE_WEIGHTS}``; every stage's box head is built from ``FAST_RCNN.*`` like the plain one."""
        c = cfg.CASCADE_RCNN
        if parts.pop("box_head", None) is not None or parts.pop("box_outs", None) is not None:
            raise ValueError("a cascade builds one box head per stage from the config; box_head / box_outs cannot "
                             "be given")
        heads, outs = [], []
        for _ in c.IOUS:
            head = build_box_head(cfg, in_channels, spatial_scales)
            heads.append(head)
            outs.append(FastRCNNOutputs.from_cfg(cfg, head.out_channels))
        # The mask and keypoint branches, sampling and test settings come from the plain builder.
        kwargs = ROIHeads.cfg_kwargs(cfg, in_channels, spatial_scales, box_head=heads[0], box_outs=outs[0], **parts)
        for key in ("box_head", "box_outs", "box_coder"):
            kwargs.pop(key)
        legacy = bool(cfg.MODEL.LEGACY_PLUS_ONE)
        return cls(heads, outs, box_coders=[BoxCoder(tuple(w), legacy_plus_one=legacy) for w in c.BBOX_REG_WEIGHTS],
                   ious=list(c.IOUS), stage_loss_weights=list(c.STAGE_WEIGHTS), **kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.Box_Head)

    # --- one stage ------------------------------------------------------------------------------------------------
    def run_stage(self, k: int, features: BlobConv, rois: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """``(cls_score (R, K+1), bbox_pred (R, 8))`` of stage ``k`` on per-image ``rois``."""
        if self.training:
            features = _scaled_features(features, 1.0 / self.num_stages)
        feat = self.Box_Head[k](features, rois)
        return self.Box_Outs[k](feat[0] if isinstance(feat, tuple) else feat)

    def regressed_boxes(self, k: int, bbox_pred: Tensor, rois: List[Tensor],
                        image_sizes: Sequence[Tuple[int, int]]) -> List[Tensor]:
        """Stage ``k``'s class-agnostic boxes of ``rois``, detached and clipped: the next stage's RoIs."""
        legacy = bool(getattr(self.box_coders[k], "legacy_plus_one", False))
        boxes = self.box_coders[k].decode(bbox_pred.detach()[:, -4:], torch.cat(rois)) if rois else bbox_pred[:0, :4]
        return [clip_boxes_to_image(b, tuple(s), legacy_plus_one=legacy)
                for b, s in zip(boxes.split([int(r.shape[0]) for r in rois]), image_sizes)]

    def label_stage(self, k: int, rois: List[Tensor], targets: List[Dict[str, Tensor]]
                    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Labels ``(R_i,)`` int64 (0 background) and encoded targets ``(R_i, 4)`` of every RoI of stage ``k``."""
        labels, reg = [], []
        coder = self.box_coders[k]
        legacy = bool(getattr(coder, "legacy_plus_one", False))
        for r, t in zip(rois, targets):
            gt = t["boxes"].to(device=r.device, dtype=r.dtype)
            if gt.shape[0] == 0 or r.shape[0] == 0:
                labels.append(torch.zeros((r.shape[0],), dtype=torch.int64, device=r.device))
                reg.append(torch.zeros_like(r))
                continue
            raw = self.stage_matchers[k](box_iou(gt, r, legacy_plus_one=legacy))
            matched = raw.clamp(min=0)
            lab = t["labels"].to(device=r.device, dtype=torch.int64)[matched]
            lab[raw < 0] = 0
            labels.append(lab)
            reg.append(coder.encode(gt[matched], r).to(r.dtype))
        return labels, reg

    # --- training -------------------------------------------------------------------------------------------------
    def forward(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        """As :meth:`ROIHeads.forward`; the training losses are ``loss_cls_stage{k}`` / ``loss_bbox_stage{k}`` per
        stage (and ``loss_mask`` / ``loss_keypoint``)."""
        if not self.training:
            return super().forward(features, proposals, image_sizes, targets)
        self.check_inputs(proposals, image_sizes, targets)
        return [], self.cascade_losses(features, proposals, image_sizes, targets)

    def cascade_losses(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]],
                       targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Every stage's losses (see the module docstring) and the mask / keypoint losses on stage 0's RoIs."""
        sampled = self.select_training_samples(proposals, targets)
        rois, labels, reg = list(sampled.rois), list(sampled.labels), list(sampled.regression_targets)
        losses: Dict[str, Tensor] = {}
        bbox_pred: Optional[Tensor] = None
        for k in range(self.num_stages):
            if k > 0:
                rois = self.regressed_boxes(k - 1, bbox_pred, rois, image_sizes)
                # detectron2 drops the boxes that regressed to nothing before labelling the next stage.
                rois = [r[(r[:, 2] > r[:, 0]) & (r[:, 3] > r[:, 1])] for r in rois]
                labels, reg = self.label_stage(k, rois, targets)
            cls_score, bbox_pred = self.run_stage(k, features, rois)
            loss_cls, loss_bbox = fast_rcnn_losses(cls_score, bbox_pred, torch.cat(labels), torch.cat(reg),
                                                   beta=self.box_smooth_l1_beta)
            w = self.stage_loss_weights[k]
            losses[f"loss_cls_stage{k}"] = loss_cls * w
            losses[f"loss_bbox_stage{k}"] = loss_bbox * w
        if self.mask_on:
            losses["loss_mask"] = self.mask_loss(features, sampled, [t["masks"] for t in targets])
        if self.keypoints_on:
            losses["loss_keypoint"] = self.keypoint_loss(features, sampled, [t["keypoints"] for t in targets])
        return losses

    # --- inference ------------------------------------------------------------------------------------------------
    def predict_boxes(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]]
                      ) -> Tuple[List[Tensor], List[Tensor]]:
        """Mean class probabilities over the stages and the last stage's boxes for every class (per image
        ``(P_i, K+1)`` and ``(P_i, 4(K+1))``, clipped), for the RoIs ``proposals`` (detectron2's
        ``CascadeROIHeads._forward_box`` before ``fast_rcnn_inference``)."""
        rois = list(proposals)
        probs_sum: Optional[List[Tensor]] = None
        for k in range(self.num_stages):
            if k > 0:
                rois = self.regressed_boxes(k - 1, bbox_pred, rois, image_sizes)
            cls_score, bbox_pred = self.run_stage(k, features, rois)
            probs, boxes = class_probs_and_boxes(cls_score, bbox_pred, rois, image_sizes, self.box_coders[k],
                                                 cls_agnostic=True, bbox_reg=self.bbox_reg)
            probs_sum = probs if probs_sum is None else [a + b for a, b in zip(probs_sum, probs)]
        return [p * (1.0 / self.num_stages) for p in probs_sum], boxes
