"""``Generalized_RCNN``: composes preprocessing, ``Conv_Body``, ``RPN``, ``Box_Head``/``Box_Outs`` and
``Mask_Head``/``Mask_Outs``. It holds no logic beyond the flow of data between them.

Eval: ``model(images)`` with ``images`` a list of ``(3, H, W)`` float RGB tensors in ``[0, 1]`` returns, per image,
``{"boxes": (N, 4) x1y1x2y2 input pixels, "labels": (N,) int64 in 1..K, "scores": (N,), "masks": (N, 1, H, W)
float probabilities}``.

Train: ``model(images, targets)`` with targets ``{"boxes": (G, 4), "labels": (G,) int64, "masks": (G, H, W) uint8,
optional "iscrowd": (G,)}`` returns ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}``.
Crowd instances (``iscrowd == 1``) are never trained as objects: anchors and RoIs covering them are ignored.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import assert_and_infer_cfg
from ..config import cfg as global_cfg
from ..ops.box_coder import BoxCoder
from ..ops.masks import project_masks_on_boxes
from ..ops.matcher import Matcher
from ..ops.sampler import BalancedPositiveNegativeSampler
from .backbone.conv_body import build_conv_body
from .preprocess import ImageList, Preprocessor
from .roi_heads.box_head import build_box_head
from .roi_heads.box_outputs import FastRCNNOutputs, fast_rcnn_losses
from .roi_heads.inference import postprocess_detections
from .roi_heads.mask_head import build_mask_head
from .roi_heads.mask_outputs import MaskRCNNOutputs, mask_probs_for_labels, mask_rcnn_loss
from .roi_heads.sampling import sample_rois
from .rpn.rpn import RPN

__all__ = ["Generalized_RCNN", "infer_spatial_scales"]


def _as_list(blob_conv: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    return [blob_conv] if isinstance(blob_conv, Tensor) else list(blob_conv)


@torch.no_grad()
def infer_spatial_scales(conv_body: nn.Module, size: int = 256) -> List[float]:
    """Feature-map scales of a body that does not declare ``spatial_scales`` (e.g. a user's backbone), found by
    running it once on a ``size x size`` zero image; each scale is rounded to a power of two as torchvision does."""
    was_training = conv_body.training
    conv_body.eval()
    try:
        param = next(iter(conv_body.parameters()), None)
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        feats = _as_list(conv_body(x))
    finally:
        conv_body.train(was_training)
    scales = []
    for f in feats:
        approx = f.shape[-1] / float(size)
        scales.append(2.0 ** round(torch.log2(torch.tensor(approx)).item()))
    return scales


class Generalized_RCNN(nn.Module):  # noqa: N801 (Detectron's name)
    """Mask R-CNN / Faster R-CNN in the Detectron layout.

    Args:
        cfg: a config (``maskrcnn.config.get_cfg()`` merged with a file); ``None`` means the global ``cfg``
            (Detectron style). It is validated (and FPN/block type inferred) on a copy.
        conv_body, rpn, box_head, box_outs, mask_head, mask_outs, preprocess: optional replacements for the parts
            the config would build (a custom backbone is any module with ``out_channels``; it may declare
            ``spatial_scales``, finest first, or they are measured once).
    """

    def __init__(self, cfg=None, *, conv_body: Optional[nn.Module] = None, rpn: Optional[nn.Module] = None,
                 box_head: Optional[nn.Module] = None, box_outs: Optional[nn.Module] = None,
                 mask_head: Optional[nn.Module] = None, mask_outs: Optional[nn.Module] = None,
                 preprocess: Optional[Preprocessor] = None):
        super().__init__()
        cfg = (global_cfg if cfg is None else cfg).clone()
        cfg.defrost()
        assert_and_infer_cfg(cfg, make_immutable=True)
        self.cfg = cfg
        self.mask_on = bool(cfg.MODEL.MASK_ON)
        self.rpn_only = bool(cfg.MODEL.RPN_ONLY)

        self.preprocess = preprocess if preprocess is not None else Preprocessor.from_cfg(cfg)
        self.Conv_Body = conv_body if conv_body is not None else build_conv_body(cfg)
        if not hasattr(self.Conv_Body, "out_channels"):
            raise ValueError("conv_body must have an integer attribute `out_channels`")
        in_channels = int(self.Conv_Body.out_channels)
        scales = getattr(self.Conv_Body, "spatial_scales", None)
        if scales is None:
            scales = infer_spatial_scales(self.Conv_Body)
        self.spatial_scales = list(scales)

        self.RPN = rpn if rpn is not None else RPN.from_cfg(cfg, in_channels, spatial_scales=self.spatial_scales)
        if not self.rpn_only:
            self.Box_Head = box_head if box_head is not None else build_box_head(cfg, in_channels, self.spatial_scales)
            self.Box_Outs = box_outs if box_outs is not None else FastRCNNOutputs.from_cfg(
                cfg, self.Box_Head.out_channels)
            if self.mask_on:
                self.Mask_Head = mask_head if mask_head is not None else build_mask_head(
                    cfg, in_channels, self.spatial_scales, box_head=self.Box_Head)
                self.Mask_Outs = mask_outs if mask_outs is not None else MaskRCNNOutputs.from_cfg(
                    cfg, self.Mask_Head.out_channels)

        # Training-time RoI sampling and test-time post-processing settings (plain objects, no parameters).
        self.box_coder = BoxCoder(tuple(cfg.MODEL.BBOX_REG_WEIGHTS), legacy_plus_one=cfg.MODEL.LEGACY_PLUS_ONE)
        self.roi_matcher = Matcher(cfg.TRAIN.FG_THRESH, cfg.TRAIN.BG_THRESH_HI, allow_low_quality_matches=False)
        self.roi_sampler = BalancedPositiveNegativeSampler(cfg.TRAIN.BATCH_SIZE_PER_IM, cfg.TRAIN.FG_FRACTION)
        self.bg_thresh_lo = float(cfg.TRAIN.BG_THRESH_LO)
        self.crowd_thresh = float(cfg.TRAIN.CROWD_FILTER_THRESH)
        self.score_thresh = float(cfg.TEST.SCORE_THRESH)
        self.nms_thresh = float(cfg.TEST.NMS)
        self.detections_per_img = int(cfg.TEST.DETECTIONS_PER_IM)
        self.min_box_size = float(cfg.TEST.MIN_BOX_SIZE)
        self.cls_agnostic_bbox_reg = bool(cfg.MODEL.CLS_AGNOSTIC_BBOX_REG)
        self.bbox_reg = bool(cfg.TEST.BBOX_REG)
        self.mask_resolution = int(cfg.MRCNN.RESOLUTION)
        self.mask_loss_weight = float(cfg.MRCNN.WEIGHT_LOSS_MASK)

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets (list of dicts with boxes, labels, masks)")
        if self.training:
            _check_targets(targets, self.mask_on)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.preprocess(images, targets)
        blob_conv = self.Conv_Body(image_list.tensors)
        if self.training:
            return self._forward_train(blob_conv, image_list, targets)
        results = self.detect(blob_conv, image_list)
        return self.preprocess.postprocess(results, image_list.image_sizes, original_sizes)

    # --- training -----------------------------------------------------------------------------------------------
    def _forward_train(self, blob_conv, image_list: ImageList, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        gt_boxes, gt_labels, gt_masks, crowd_boxes = _split_crowd(targets)
        rpn_targets = [{"boxes": b, "crowd_boxes": c} for b, c in zip(gt_boxes, crowd_boxes)]
        proposals, losses = self.RPN(blob_conv, image_list.image_sizes, rpn_targets,
                                     batch_shape=tuple(image_list.tensors.shape[-2:]))
        losses = dict(losses)
        if self.rpn_only:
            return losses
        sampled = sample_rois(proposals, gt_boxes, gt_labels, self.roi_matcher, self.roi_sampler, self.box_coder,
                              crowd_boxes=crowd_boxes, crowd_thresh=self.crowd_thresh,
                              bg_thresh_lo=self.bg_thresh_lo)
        box_out = self.Box_Head(blob_conv, sampled.rois, **self._res5_kwargs())
        box_feat, res5_map = box_out if isinstance(box_out, tuple) else (box_out, None)
        cls_score, bbox_pred = self.Box_Outs(box_feat)
        labels = torch.cat(sampled.labels)
        loss_cls, loss_bbox = fast_rcnn_losses(cls_score, bbox_pred, labels, torch.cat(sampled.regression_targets))
        losses["loss_cls"], losses["loss_bbox"] = loss_cls, loss_bbox
        if self.mask_on:
            losses["loss_mask"] = self.mask_on_fg(blob_conv, sampled, gt_masks, res5_map) * self.mask_loss_weight
        return losses

    def _res5_kwargs(self) -> Dict[str, bool]:
        # The C4 box head hands its res5 map to the shared (v0upshare) mask head.
        return {"return_res5": True} if getattr(self, "Mask_Head", None) is not None and getattr(
            self.Mask_Head, "shares_box_head_res5", False) else {}

    def mask_on_fg(self, blob_conv, sampled, gt_masks: List[Tensor], res5_map: Optional[Tensor]) -> Tensor:
        """Mask loss on the foreground RoIs of ``sampled`` (Detectron: masks are learnt on fg RoIs only)."""
        fg_rois, fg_labels, fg_targets, keep = [], [], [], []
        offset = 0
        for rois, labels, matched, masks in zip(sampled.rois, sampled.labels, sampled.matched_idxs, gt_masks):
            fg = torch.nonzero(labels > 0).squeeze(1)
            fg_rois.append(rois[fg])
            fg_labels.append(labels[fg])
            fg_targets.append(project_masks_on_boxes(masks, rois[fg], matched[fg], self.mask_resolution))
            keep.append(fg + offset)
            offset += rois.shape[0]
        if getattr(self.Mask_Head, "shares_box_head_res5", False):
            mask_feat = self.Mask_Head(res5_map[torch.cat(keep)])
        else:
            mask_feat = self.Mask_Head(blob_conv, fg_rois)
        mask_logits = self.Mask_Outs(mask_feat)
        return mask_rcnn_loss(mask_logits, torch.cat(fg_labels), torch.cat(fg_targets))

    # --- inference ----------------------------------------------------------------------------------------------
    def detect(self, blob_conv, image_list: ImageList, proposals: Optional[List[Tensor]] = None
               ) -> List[Dict[str, Tensor]]:
        """Detections in resized-image coordinates; masks are ``(N, 1, M, M)`` probabilities (not pasted)."""
        if proposals is None:
            proposals, _ = self.RPN(blob_conv, image_list.image_sizes, None,
                                    batch_shape=tuple(image_list.tensors.shape[-2:]))
        if self.rpn_only:
            return [{"boxes": p, "scores": torch.ones_like(p[:, 0]),
                     "labels": torch.ones_like(p[:, 0], dtype=torch.int64)} for p in proposals]
        box_feat = self.Box_Head(blob_conv, proposals)
        if isinstance(box_feat, tuple):
            box_feat = box_feat[0]
        cls_score, bbox_pred = self.Box_Outs(box_feat)
        if not self.bbox_reg:
            bbox_pred = torch.zeros_like(bbox_pred)
        boxes, scores, labels = postprocess_detections(
            cls_score, bbox_pred, proposals, image_list.image_sizes, self.box_coder, self.score_thresh,
            self.nms_thresh, self.detections_per_img, min_size=self.min_box_size,
            cls_agnostic=self.cls_agnostic_bbox_reg)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        if self.mask_on:
            masks = self.mask_probs(blob_conv, boxes, labels)
            for r, m in zip(results, masks):
                r["masks"] = m
        return results

    def mask_probs(self, blob_conv, boxes: List[Tensor], labels: List[Tensor]) -> List[Tensor]:
        """``(Ni, 1, M, M)`` probabilities of the mask of each box's label."""
        if getattr(self.Mask_Head, "shares_box_head_res5", False):
            _, res5_map = self.Box_Head(blob_conv, boxes, return_res5=True)
            mask_feat = self.Mask_Head(res5_map)
        else:
            mask_feat = self.Mask_Head(blob_conv, boxes)
        probs = mask_probs_for_labels(self.Mask_Outs(mask_feat), torch.cat(labels))
        return list(probs.split([b.shape[0] for b in boxes]))


def _check_targets(targets: List[Dict[str, Tensor]], mask_on: bool) -> None:
    for i, t in enumerate(targets):
        for key in ("boxes", "labels") + (("masks",) if mask_on else ()):
            if key not in t:
                raise ValueError(f"target {i} has no {key!r} (keys: {sorted(t)})")
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be (N, 4), got shape {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if boxes.numel() and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            bad = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).flatten().tolist()
            raise ValueError(f"target {i}: boxes {bad} have zero or negative width/height: {boxes[bad].tolist()}")


def _split_crowd(targets: List[Dict[str, Tensor]]) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Separate crowd regions (ignored, never trained as objects) from the instances."""
    boxes, labels, masks, crowd = [], [], [], []
    for t in targets:
        is_crowd = t.get("iscrowd")
        if is_crowd is None:
            keep = torch.ones(t["boxes"].shape[0], dtype=torch.bool, device=t["boxes"].device)
        else:
            keep = is_crowd.to(t["boxes"].device) == 0
        boxes.append(t["boxes"][keep])
        labels.append(t["labels"][keep])
        if "masks" in t:
            masks.append(t["masks"][keep])
        crowd.append(t["boxes"][~keep])
    return boxes, labels, masks, crowd
