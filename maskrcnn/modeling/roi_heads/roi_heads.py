"""``ROIHeads``: everything that happens per RoI, between the RPN's proposals and the final detections.

It owns the Detectron heads (``Box_Head``, ``Box_Outs``, optionally ``Mask_Head``, ``Mask_Outs`` and
``Keypoint_Head``, ``Keypoint_Outs``), the Fast R-CNN
box coder, the training-time RoI matcher and sampler, the losses, the box post-processing and the C4 res5 sharing
(the ``v0upshare`` mask head consumes the box head's res5 map instead of pooling its own). Further heads (cascade
stages) belong here as well, next to the mask and keypoint branches.

Contract (torchvision / detectron2 style)::

    results, losses = roi_heads(features, proposals, image_sizes, targets=None)

- ``features``: the ``Conv_Body`` output, a ``(N, C, H, W)`` Tensor (C4) or a list of them, finest first (FPN).
- ``proposals``: per image ``(P_i, 4)`` float boxes ``x1, y1, x2, y2`` in network-input pixels.
- ``image_sizes``: per image ``(height, width)`` of the resized image before padding (boxes are clipped to it).
- ``targets`` (training): per image ``{"boxes": (G, 4) float, "labels": (G,) int64 in 1..K, "masks": (G, H, W)
  uint8 in network-input pixels (with a mask head), "keypoints": (G, K, 3) float x, y, visibility (with a keypoint
  head), optional "crowd_boxes": (C, 4)}`` (crowd regions, ignored).
- training: ``results == []`` and ``losses == {"loss_cls", "loss_bbox"[, "loss_mask"][, "loss_keypoint"]}``.
- inference: ``losses == {}`` and ``results`` per image ``{"boxes": (D, 4), "scores": (D,), "labels": (D,) int64,
  ["masks": (D, 1, M, M) float probabilities, not pasted], ["keypoints": (D, K, 3) float x, y, 1,
  "keypoints_scores": (D, K) float heatmap logits]}``, boxes and keypoints in network-input pixels, by decreasing
  score.

The pieces are public so that the Detectron API (``maskrcnn/core/test.py``) runs the same code:
:meth:`ROIHeads.predict_boxes` (class probabilities and per-class boxes of given RoIs),
:meth:`ROIHeads.postprocess_detections` and :meth:`ROIHeads.mask_probs`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.box_voting import BoxVoting
from ...ops.masks import project_masks_on_boxes_batch
from ...ops.matcher import Matcher
from ...ops.roi_align import shared_feature_tables
from ...ops.sampler import BalancedPositiveNegativeSampler
from .box_head import BlobConv, build_box_head
from .box_outputs import FastRCNNOutputs, fast_rcnn_losses
from .inference import class_probs_and_boxes, select_detections
from .keypoint_head import build_keypoint_head
from .keypoint_outputs import KeypointRCNNOutputs, heatmaps_to_keypoints, keypoint_rcnn_loss
from .mask_head import build_mask_head
from .mask_outputs import MaskRCNNOutputs, mask_dice_loss, mask_probs_for_labels, mask_rcnn_loss
from .sampling import SampledRoIs, sample_rois

__all__ = ["ROIHeads"]

Detections = List[Dict[str, Tensor]]


class ROIHeads(nn.Module):
    """Box (and mask) heads on RoIs, with their sampling, losses and post-processing.

    Args:
        box_head: RoI features ``forward(features, rois) -> (R, D)`` with ``out_channels`` (``Box_Head``). A head
            that can also return its res5 map (``forward(..., return_res5=True) -> (feat, (R, C5, h, w))``, the C4
            :class:`~maskrcnn.modeling.roi_heads.box_head.ResNetRoIConv5Head`) may feed a sharing mask head.
        box_outs: ``forward((R, D)) -> (cls_score (R, K+1), bbox_pred (R, 4(K+1)), or (R, 8) / (R, 4) for
            class-agnostic regression)`` (``Box_Outs``); the regression layout is read from its output width.
        box_coder: Fast R-CNN box coder (``MODEL.BBOX_REG_WEIGHTS``, default (10, 10, 5, 5)); its
            ``legacy_plus_one`` also sets the IoU, clipping and minimum-size convention.
        proposal_matcher: RoI-to-ground-truth matcher (``TRAIN.FG_THRESH``, ``TRAIN.BG_THRESH_HI``; default 0.5, 0.5).
        fg_bg_sampler: RoI sampler (``TRAIN.BATCH_SIZE_PER_IM``, ``TRAIN.FG_FRACTION``; default 512, 0.25).
        bg_thresh_lo: background RoIs with IoU below it are not sampled (``TRAIN.BG_THRESH_LO``).
        crowd_thresh: RoIs covered by a crowd region for more than this fraction are ignored
            (``TRAIN.CROWD_FILTER_THRESH``).
        score_thresh, nms_thresh, detections_per_img, min_box_size: detection post-processing (``TEST.SCORE_THRESH``,
            ``TEST.NMS``, ``TEST.DETECTIONS_PER_IM``, ``TEST.MIN_BOX_SIZE`` in network-input pixels).
        bbox_reg: apply the box regression at test time (``TEST.BBOX_REG``); False keeps the RoIs.
        box_smooth_l1_beta: transition point of the smooth L1 box loss (``FAST_RCNN.SMOOTH_L1_BETA``; 1/9 as
            torchvision, Detectron uses 1.0).
        mask_head, mask_outs: the mask branch (``Mask_Head``, ``Mask_Outs``), both or neither. A mask head with
            ``shares_box_head_res5 = True`` takes the box head's res5 map instead of ``(features, rois)``.
        mask_resolution: side ``M`` of the mask targets (``MRCNN.RESOLUTION``; the mask logits' side).
        mask_loss_weight: factor on the mask loss (``MRCNN.WEIGHT_LOSS_MASK``).
        mask_dice_weight: factor on a Dice loss added to the mask cross entropy (``MRCNN.DICE_LOSS_WEIGHT``); the
            sum is then scaled by ``mask_loss_weight``. 0 is Detectron's loss.
        keypoint_head, keypoint_outs: the keypoint branch (``Keypoint_Head``, ``Keypoint_Outs``), both or neither.
        keypoint_loss_weight: factor on the keypoint loss (``KRCNN.LOSS_WEIGHT``).
        keypoint_loss_normalizer: None averages the keypoint loss over the visible keypoints
            (``KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS``); a number is Detectron's fixed divisor of its sum.
        box_voting: refine the detections by box voting (``TEST.BBOX_VOTE``); None: no voting.
    """

    def __init__(self, box_head: nn.Module, box_outs: nn.Module, *, box_coder: Optional[BoxCoder] = None,
                 proposal_matcher: Optional[Matcher] = None,
                 fg_bg_sampler: Optional[BalancedPositiveNegativeSampler] = None, bg_thresh_lo: float = 0.0,
                 crowd_thresh: float = 0.7, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, min_box_size: float = 0.0, bbox_reg: bool = True,
                 box_smooth_l1_beta: float = 1.0 / 9, mask_head: Optional[nn.Module] = None,
                 mask_outs: Optional[nn.Module] = None, mask_resolution: int = 28, mask_loss_weight: float = 1.0,
                 mask_dice_weight: float = 0.0,
                 keypoint_head: Optional[nn.Module] = None, keypoint_outs: Optional[nn.Module] = None,
                 keypoint_loss_weight: float = 1.0, keypoint_loss_normalizer: Optional[float] = None,
                 box_voting: Optional[BoxVoting] = None):
        super().__init__()
        if not isinstance(box_head, nn.Module) or not isinstance(box_outs, nn.Module):
            raise TypeError(f"box_head and box_outs must be nn.Modules, got {type(box_head).__name__} and "
                            f"{type(box_outs).__name__}")
        if (mask_head is None) != (mask_outs is None):
            raise ValueError("mask_head and mask_outs go together: pass both (Mask R-CNN) or neither (Faster R-CNN)")
        if (keypoint_head is None) != (keypoint_outs is None):
            raise ValueError("keypoint_head and keypoint_outs go together: pass both (Keypoint R-CNN) or neither")
        if keypoint_loss_normalizer is not None and not float(keypoint_loss_normalizer) > 0:
            raise ValueError(f"keypoint_loss_normalizer must be > 0 or None, got {keypoint_loss_normalizer}")
        if int(detections_per_img) < 1:
            raise ValueError(f"detections_per_img must be >= 1, got {detections_per_img}")
        if int(mask_resolution) < 1:
            raise ValueError(f"mask_resolution must be >= 1, got {mask_resolution}")
        # Detectron.pytorch's attribute names: checkpoints and converters address them (Box_Head.fc6.weight, ...).
        self.register_module("Box_Head", box_head)
        self.register_module("Box_Outs", box_outs)
        self.register_module("Mask_Head", mask_head)
        self.register_module("Mask_Outs", mask_outs)
        self.register_module("Keypoint_Head", keypoint_head)
        self.register_module("Keypoint_Outs", keypoint_outs)
        self.box_coder = box_coder if box_coder is not None else BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.proposal_matcher = proposal_matcher if proposal_matcher is not None else Matcher(0.5, 0.5)
        self.fg_bg_sampler = fg_bg_sampler if fg_bg_sampler is not None else BalancedPositiveNegativeSampler(512, 0.25)
        self.bg_thresh_lo = float(bg_thresh_lo)
        self.crowd_thresh = float(crowd_thresh)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.min_box_size = float(min_box_size)
        self.bbox_reg = bool(bbox_reg)
        if not float(box_smooth_l1_beta) >= 0.0:
            raise ValueError(f"box_smooth_l1_beta must be >= 0, got {box_smooth_l1_beta}")
        self.box_smooth_l1_beta = float(box_smooth_l1_beta)
        self.mask_resolution = int(mask_resolution)
        self.mask_loss_weight = float(mask_loss_weight)
        if not float(mask_dice_weight) >= 0.0:
            raise ValueError(f"mask_dice_weight must be >= 0, got {mask_dice_weight}")
        self.mask_dice_weight = float(mask_dice_weight)
        self.keypoint_loss_weight = float(keypoint_loss_weight)
        self.keypoint_loss_normalizer = None if keypoint_loss_normalizer is None else float(keypoint_loss_normalizer)
        if box_voting is not None and not isinstance(box_voting, BoxVoting):
            raise TypeError(f"box_voting must be a maskrcnn.ops.BoxVoting or None, got {type(box_voting).__name__}")
        self.box_voting = box_voting

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float], *, box_head: Optional[nn.Module] = None,
                 box_outs: Optional[nn.Module] = None, mask_head: Optional[nn.Module] = None,
                 mask_outs: Optional[nn.Module] = None, keypoint_head: Optional[nn.Module] = None,
                 keypoint_outs: Optional[nn.Module] = None) -> "ROIHeads":
        """Build the heads named by the config (see :meth:`cfg_kwargs`)."""
        kwargs = cls.cfg_kwargs(cfg, in_channels, spatial_scales, box_head=box_head, box_outs=box_outs,
                                mask_head=mask_head, mask_outs=mask_outs, keypoint_head=keypoint_head,
                                keypoint_outs=keypoint_outs)
        return cls(kwargs.pop("box_head"), kwargs.pop("box_outs"), **kwargs)

    @staticmethod
    def cfg_kwargs(cfg, in_channels: int, spatial_scales: Sequence[float], *, box_head: Optional[nn.Module] = None,
                   box_outs: Optional[nn.Module] = None, mask_head: Optional[nn.Module] = None,
                   mask_outs: Optional[nn.Module] = None, keypoint_head: Optional[nn.Module] = None,
                   keypoint_outs: Optional[nn.Module] = None) -> Dict[str, object]:
        """The constructor's arguments (``box_head`` and ``box_outs`` included) from the config: the heads it
        names (``FAST_RCNN.ROI_BOX_HEAD``, ``MRCNN.ROI_MASK_HEAD`` when ``MODEL.MASK_ON``) on a body with
        ``in_channels`` and ``spatial_scales`` (finest first); any given head is used instead. Other keys:
        ``MODEL.{BBOX_REG_WEIGHTS, LEGACY_PLUS_ONE}``, ``TRAIN.{FG_THRESH, BG_THRESH_HI, BG_THRESH_LO,
        BATCH_SIZE_PER_IM, FG_FRACTION, CROWD_FILTER_THRESH}``, ``TEST.{SCORE_THRESH, NMS, DETECTIONS_PER_IM,
        MIN_BOX_SIZE, BBOX_REG}``, ``TEST.BBOX_VOTE.*``, ``FAST_RCNN.SMOOTH_L1_BETA``, ``MRCNN.{RESOLUTION,
        WEIGHT_LOSS_MASK}``; with ``MODEL.KEYPOINTS_ON`` ``KRCNN.ROI_KEYPOINTS_HEAD`` and ``KRCNN.{LOSS_WEIGHT,
        NORMALIZE_BY_VISIBLE_KEYPOINTS, NUM_KEYPOINTS}``, ``TRAIN.IMS_PER_BATCH`` (Detectron's normaliser)."""
        mask_on = bool(cfg.MODEL.MASK_ON)
        if not mask_on and (mask_head is not None or mask_outs is not None):
            raise ValueError("mask_head / mask_outs were given but MODEL.MASK_ON is False; set MODEL.MASK_ON True "
                             "to build a Mask R-CNN")
        # Built in this order (box head, box outputs, mask head, mask outputs) so that seeded initialisations are
        # those of Detectron.pytorch's Generalized_RCNN.
        if box_head is None:
            box_head = build_box_head(cfg, in_channels, spatial_scales)
        if box_outs is None:
            box_outs = FastRCNNOutputs.from_cfg(cfg, box_head.out_channels)
        if mask_on:
            if mask_head is None:
                mask_head = build_mask_head(cfg, in_channels, spatial_scales, box_head=box_head)
            if mask_outs is None:
                mask_outs = MaskRCNNOutputs.from_cfg(cfg, mask_head.out_channels)
        kps_on = bool(cfg.MODEL.KEYPOINTS_ON)
        if not kps_on and (keypoint_head is not None or keypoint_outs is not None):
            raise ValueError("keypoint_head / keypoint_outs were given but MODEL.KEYPOINTS_ON is False; set it True "
                             "to build a Keypoint R-CNN")
        t, s, k = cfg.TRAIN, cfg.TEST, cfg.KRCNN
        kps_normalizer = None
        if kps_on:
            if keypoint_head is None:
                keypoint_head = build_keypoint_head(cfg, in_channels, spatial_scales)
            if keypoint_outs is None:
                keypoint_outs = KeypointRCNNOutputs.from_cfg(cfg, keypoint_head.out_channels)
            if not k.NORMALIZE_BY_VISIBLE_KEYPOINTS:
                # Detectron: the expected number of keypoints of a full minibatch, whatever this one holds.
                kps_normalizer = t.IMS_PER_BATCH * t.BATCH_SIZE_PER_IM * t.FG_FRACTION * k.NUM_KEYPOINTS
        vote = s.BBOX_VOTE
        box_voting = BoxVoting(vote.VOTE_TH, vote.SCORING_METHOD, vote.SCORING_METHOD_BETA,
                               legacy_plus_one=cfg.MODEL.LEGACY_PLUS_ONE) if vote.ENABLED else None
        return dict(
            box_head=box_head, box_outs=box_outs,
            box_coder=BoxCoder(tuple(cfg.MODEL.BBOX_REG_WEIGHTS), legacy_plus_one=cfg.MODEL.LEGACY_PLUS_ONE),
            proposal_matcher=Matcher(t.FG_THRESH, t.BG_THRESH_HI, allow_low_quality_matches=False),
            fg_bg_sampler=BalancedPositiveNegativeSampler(t.BATCH_SIZE_PER_IM, t.FG_FRACTION),
            bg_thresh_lo=t.BG_THRESH_LO, crowd_thresh=t.CROWD_FILTER_THRESH, score_thresh=s.SCORE_THRESH,
            nms_thresh=s.NMS, detections_per_img=s.DETECTIONS_PER_IM, min_box_size=s.MIN_BOX_SIZE,
            bbox_reg=s.BBOX_REG, box_smooth_l1_beta=cfg.FAST_RCNN.SMOOTH_L1_BETA, mask_head=mask_head,
            mask_outs=mask_outs, mask_resolution=cfg.MRCNN.RESOLUTION, mask_loss_weight=cfg.MRCNN.WEIGHT_LOSS_MASK,
            mask_dice_weight=cfg.MRCNN.DICE_LOSS_WEIGHT,
            keypoint_head=keypoint_head, keypoint_outs=keypoint_outs, keypoint_loss_weight=k.LOSS_WEIGHT,
            keypoint_loss_normalizer=kps_normalizer,
            box_voting=box_voting,
        )

    # --- structure ------------------------------------------------------------------------------------------------
    @property
    def mask_on(self) -> bool:
        """Whether there is a mask branch."""
        return self.Mask_Head is not None

    @property
    def keypoints_on(self) -> bool:
        """Whether there is a keypoint branch."""
        return self.Keypoint_Head is not None

    @property
    def shares_res5(self) -> bool:
        """Whether the mask head runs on the box head's res5 map (Detectron's C4 ``v0upshare``)."""
        return self.Mask_Head is not None and bool(getattr(self.Mask_Head, "shares_box_head_res5", False))

    def _box_features(self, features: BlobConv, rois, keep_res5: bool = False
                      ) -> Tuple[Tensor, Optional[Tensor]]:
        """``(R, D)`` box features and, with ``keep_res5`` and a sharing mask head, the ``(R, C5, h, w)`` res5 map."""
        if keep_res5 and self.shares_res5:
            feat, res5_map = self.Box_Head(features, rois, return_res5=True)
            return feat, res5_map
        out = self.Box_Head(features, rois)
        return (out[0] if isinstance(out, tuple) else out), None

    def _mask_features(self, features: BlobConv, rois, res5_map: Optional[Tensor] = None) -> Tensor:
        """Mask head output for ``rois``; a sharing head takes ``res5_map`` (the box head's, computed when None)."""
        if self.shares_res5:
            if res5_map is None:
                _, res5_map = self.Box_Head(features, rois, return_res5=True)
            return self.Mask_Head(res5_map)
        return self.Mask_Head(features, rois)

    # --- forward --------------------------------------------------------------------------------------------------
    def forward(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[Detections, Dict[str, Tensor]]:
        """Run the heads on one batch.

        Args:
            features: ``Conv_Body`` output, ``(N, C, H, W)`` or a list of such maps, finest first.
            proposals: per image ``(P_i, 4)`` float boxes in network-input pixels (the RPN's output).
            image_sizes: per image ``(height, width)`` of the resized image before padding.
            targets: training only, per image ``{"boxes": (G, 4), "labels": (G,) int64, "masks": (G, H, W) uint8,
                optional "crowd_boxes": (C, 4)}`` in network-input pixels.

        Returns:
            training: ``([], {"loss_cls", "loss_bbox"[, "loss_mask"][, "loss_keypoint"]})``; inference:
            ``(results, {})`` with per image ``{"boxes": (D, 4), "scores": (D,), "labels": (D,) int64 in 1..K[,
            "masks": (D, 1, M, M)][, "keypoints": (D, K, 3), "keypoints_scores": (D, K)]}``.
        """
        self.check_inputs(proposals, image_sizes, targets)
        # The box and mask/keypoint poolers pack the pooled levels into one (rows, C) table once per forward.
        with shared_feature_tables():
            if self.training:
                return [], self._losses(features, proposals, targets)
            return self._detect(features, proposals, image_sizes), {}

    def check_inputs(self, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]],
                     targets: Optional[List[Dict[str, Tensor]]]) -> None:
        """Raise a clear error for inputs that break the :meth:`forward` contract."""
        if isinstance(proposals, Tensor):
            raise TypeError("proposals must be a list of (P_i, 4) tensors, one per image")
        if len(proposals) != len(image_sizes):
            raise ValueError(f"got {len(proposals)} proposal sets for {len(image_sizes)} image sizes")
        if self.training and targets is None:
            raise ValueError("ROIHeads in training mode needs targets: one dict with 'boxes' and 'labels' "
                             "(and 'masks' with a mask head) per image")

    # --- training -------------------------------------------------------------------------------------------------
    def select_training_samples(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]) -> SampledRoIs:
        """The sampled RoIs of every image (ground truth appended, matched, balanced; see ``sampling.py``)."""
        if len(targets) != len(proposals):
            raise ValueError(f"got {len(targets)} targets for {len(proposals)} images")
        needed = ("boxes", "labels") + (("masks",) if self.mask_on else ()) + (
            ("keypoints",) if self.keypoints_on else ())
        for i, t in enumerate(targets):
            for key in needed:
                if key not in t:
                    raise ValueError(f"targets[{i}] has no {key!r} (keys: {sorted(t)})")
        return sample_rois(proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets],
                           self.proposal_matcher, self.fg_bg_sampler, self.box_coder,
                           crowd_boxes=[t.get("crowd_boxes") for t in targets], crowd_thresh=self.crowd_thresh,
                           bg_thresh_lo=self.bg_thresh_lo)

    def _losses(self, features: BlobConv, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
                ) -> Dict[str, Tensor]:
        sampled = self.select_training_samples(proposals, targets)
        box_feat, res5_map = self._box_features(features, sampled.rois, keep_res5=True)
        cls_score, bbox_pred = self.Box_Outs(box_feat)
        loss_cls, loss_bbox = fast_rcnn_losses(cls_score, bbox_pred, torch.cat(sampled.labels),
                                               torch.cat(sampled.regression_targets), beta=self.box_smooth_l1_beta)
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox}
        if self.mask_on:
            losses["loss_mask"] = self.mask_loss(features, sampled, [t["masks"] for t in targets], res5_map)
        if self.keypoints_on:
            losses["loss_keypoint"] = self.keypoint_loss(features, sampled, [t["keypoints"] for t in targets])
        return losses

    def keypoint_loss(self, features: BlobConv, sampled: SampledRoIs, gt_keypoints: List[Tensor]) -> Tensor:
        """Weighted keypoint loss on the foreground RoIs of ``sampled`` (as torchvision: every positive RoI; its
        invisible or outside keypoints do not count).

        Args:
            gt_keypoints: per image ``(G_i, K, 3)`` float ``x, y, visibility`` of the ground truth
                ``sampled.matched_idxs`` index, network-input pixels.
        """
        fg_rois, fg_kps = [], []
        for rois, labels, matched, kps in zip(sampled.rois, sampled.labels, sampled.matched_idxs, gt_keypoints):
            fg = torch.nonzero(labels > 0).squeeze(1)
            fg_rois.append(rois[fg])
            fg_kps.append(kps.to(rois.device, torch.float32)[matched[fg]])
        logits = self.Keypoint_Outs(self.Keypoint_Head(features, fg_rois))
        loss = keypoint_rcnn_loss(logits, torch.cat(fg_rois), torch.cat(fg_kps), self.keypoint_loss_normalizer)
        return loss * self.keypoint_loss_weight

    def mask_loss(self, features: BlobConv, sampled: SampledRoIs, gt_masks: List[Tensor],
                  res5_map: Optional[Tensor] = None) -> Tensor:
        """Weighted mask loss on the foreground RoIs of ``sampled`` (Detectron: masks are learnt on fg RoIs only).

        Args:
            gt_masks: per image ``(G_i, H, W)`` uint8 masks of the ground truth ``sampled.matched_idxs`` index.
            res5_map: the box head's ``(S, C5, h, w)`` map of all sampled RoIs, for a sharing mask head (computed
                on the foreground RoIs when None).
        """
        fg_rois, fg_labels, fg_matched, keep = [], [], [], []
        offset = 0
        for rois, labels, matched in zip(sampled.rois, sampled.labels, sampled.matched_idxs):
            fg = torch.nonzero(labels > 0).squeeze(1)
            fg_rois.append(rois[fg])
            fg_labels.append(labels[fg])
            fg_matched.append(matched[fg])
            keep.append(fg + offset)
            offset += rois.shape[0]
        fg_targets = project_masks_on_boxes_batch(gt_masks, fg_rois, fg_matched, self.mask_resolution)
        fg_res5 = res5_map[torch.cat(keep)] if res5_map is not None else None
        mask_logits = self.Mask_Outs(self._mask_features(features, fg_rois, fg_res5))
        labels, targets = torch.cat(fg_labels), torch.cat(fg_targets)
        loss = mask_rcnn_loss(mask_logits, labels, targets)
        if self.mask_dice_weight:
            loss = loss + self.mask_dice_weight * mask_dice_loss(mask_logits, labels, targets)
        return loss * self.mask_loss_weight

    # --- inference ------------------------------------------------------------------------------------------------
    def predict_boxes(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]]
                      ) -> Tuple[List[Tensor], List[Tensor]]:
        """Class probabilities and per-class boxes of the RoIs ``proposals`` (Detectron's ``im_detect_bbox``).

        Returns:
            per image ``(P_i, K+1)`` float32 softmax probabilities and ``(P_i, 4(K+1))`` boxes (block ``j`` is class
            ``j``'s regressed box, the RoI itself when ``bbox_reg`` is off), clipped to ``image_sizes``.
        """
        box_feat, _ = self._box_features(features, proposals)
        cls_score, bbox_pred = self.Box_Outs(box_feat)
        cls_agnostic = bbox_pred.shape[-1] != 4 * cls_score.shape[-1]
        return class_probs_and_boxes(cls_score, bbox_pred, proposals, image_sizes, self.box_coder,
                                     cls_agnostic=cls_agnostic, bbox_reg=self.bbox_reg)

    def postprocess_detections(self, probs: List[Tensor], boxes: List[Tensor]
                               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per image: score threshold, minimum size, per-class NMS, box voting when set, limit (see
        ``inference.select_detections``).

        Returns:
            ``(boxes, scores, labels)`` lists of ``(D_i, 4)``, ``(D_i,)``, ``(D_i,)`` int64 in 1..K.
        """
        legacy = bool(getattr(self.box_coder, "legacy_plus_one", False))
        out: Tuple[List[Tensor], List[Tensor], List[Tensor]] = ([], [], [])
        for p, b in zip(probs, boxes):
            for acc, t in zip(out, select_detections(p, b, self.score_thresh, self.nms_thresh,
                                                     self.detections_per_img, min_size=self.min_box_size,
                                                     legacy_plus_one=legacy, box_voting=self.box_voting)):
                acc.append(t)
        return out

    def mask_probs(self, features: BlobConv, boxes: List[Tensor], labels: Optional[List[Tensor]] = None
                   ) -> List[Tensor]:
        """Mask probabilities of ``boxes`` (per image ``(N_i, 4)`` network-input pixels).

        Returns:
            per image ``(N_i, 1, M, M)`` float probabilities of each box's ``labels`` class, or with ``labels=None``
            ``(N_i, C, M, M)`` for every class (``C = K + 1``, or 1 for a class-agnostic mask).
        """
        if not self.mask_on:
            raise RuntimeError("this ROIHeads has no mask branch (MODEL.MASK_ON is False)")
        feats = self._mask_features(features, boxes)
        if labels is None:
            probs = torch.sigmoid(self.Mask_Outs(feats).float())
        elif hasattr(self.Mask_Outs, "label_logits"):  # only the labels' channels are computed
            probs = self.Mask_Outs.label_logits(feats, torch.cat(labels)).sigmoid()
        else:
            probs = mask_probs_for_labels(self.Mask_Outs(feats), torch.cat(labels))
        return list(probs.split([int(b.shape[0]) for b in boxes]))

    def keypoints(self, features: BlobConv, boxes: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Keypoints of ``boxes`` (per image ``(N_i, 4)`` network-input pixels).

        Returns:
            per image ``(N_i, K, 3)`` float ``(x, y, 1)`` in the same pixels and ``(N_i, K)`` scores (heatmap logits).
        """
        if not self.keypoints_on:
            raise RuntimeError("this ROIHeads has no keypoint branch (MODEL.KEYPOINTS_ON is False)")
        logits = self.Keypoint_Outs(self.Keypoint_Head(features, boxes))
        kps, scores = heatmaps_to_keypoints(logits, torch.cat(boxes))
        sizes = [int(b.shape[0]) for b in boxes]
        return list(kps.split(sizes)), list(scores.split(sizes))

    def _detect(self, features: BlobConv, proposals: List[Tensor], image_sizes: Sequence[Tuple[int, int]]
                ) -> Detections:
        probs, class_boxes = self.predict_boxes(features, proposals, image_sizes)
        boxes, scores, labels = self.postprocess_detections(probs, class_boxes)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        if self.mask_on:
            for r, m in zip(results, self.mask_probs(features, boxes, labels)):
                r["masks"] = m
        if self.keypoints_on:
            for r, kp, ks in zip(results, *self.keypoints(features, boxes)):
                r["keypoints"], r["keypoints_scores"] = kp, ks
        return results
