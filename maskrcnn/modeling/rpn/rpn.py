"""``RPN``: anchors, head, proposal generation and losses behind one module with Detectron.pytorch's attribute
names (``RPN_conv``, ``RPN_cls_score``, ``RPN_bbox_pred``, ``RPN_GenerateProposals``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.matcher import Matcher
from ...ops.sampler import BalancedPositiveNegativeSampler
from .anchors import AnchorGenerator
from .head import RPNHead
from .loss import LOSS_NORMALIZATIONS, rpn_losses
from .proposals import GenerateProposals, generate_proposals, padded_batch_shape

__all__ = ["RPN"]


class RPN(nn.Module):
    """Region Proposal Network.

    Args:
        anchor_generator: :class:`~maskrcnn.modeling.rpn.anchors.AnchorGenerator`.
        head: :class:`~maskrcnn.modeling.rpn.head.RPNHead` (or a module with the same inputs and outputs).
        box_coder: encodes/decodes anchor deltas (weights ``(1, 1, 1, 1)``; its ``legacy_plus_one`` selects
            Detectron's box convention for proposals and matching).
        matcher, sampler: anchor labelling and the balanced sample used by the losses.
        pre_nms_top_n: anchors kept per level and image before NMS; post_nms_top_n: proposals kept per image;
            nms_thresh; min_size: each a number or ``{"training": .., "testing": ..}`` (the pair follows
            ``self.training``).
        straddle_thresh: ignore anchors crossing the image border by more than this in the losses (-1 keeps all).
        crowd_thresh: ignore anchors covered by a crowd region for more than this fraction of their area.
        score_thresh: proposals with a lower objectness probability are dropped.
        smooth_l1_beta: transition point of the box loss.
        loss_normalization: ``"torchvision"`` or ``"detectron"``: the divisors of the losses (see
            :mod:`maskrcnn.modeling.rpn.loss`).
        size_divisibility: padding multiple of the input batch (to recover its size when ``batch_shape`` is not
            given and the anchor strides are inferred from it).
        min_size_strict: keep proposals with sides ``> min_size`` (detectron2) instead of ``>=`` (torchvision).
        nms_on_logits: NMS ranks proposals by objectness logits (detectron2) instead of probabilities.

    ``forward(features, image_sizes, targets=None, batch_shape=None)`` returns ``(proposals, losses)``: per image
    ``(P, 4)`` detached xyxy proposals, best first, and in training ``{"loss_rpn_cls", "loss_rpn_bbox"}`` (empty
    in eval). ``targets`` are dicts with ``boxes`` ``(G, 4)`` and optionally ``crowd_boxes`` ``(C, 4)``;
    ``batch_shape`` is the padded ``(H, W)`` of the input batch.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, box_coder: BoxCoder, matcher: Matcher,
                 sampler: BalancedPositiveNegativeSampler, pre_nms_top_n, post_nms_top_n, nms_thresh=0.7,
                 min_size=0.0, straddle_thresh: float = -1, crowd_thresh: float = 0.7, score_thresh: float = 0.0,
                 smooth_l1_beta: float = 1.0 / 9, size_divisibility: int = 32,
                 loss_normalization: str = "torchvision", min_size_strict: bool = False,
                 nms_on_logits: bool = False):
        super().__init__()
        self.min_size_strict = bool(min_size_strict)
        self.nms_on_logits = bool(nms_on_logits)
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.straddle_thresh = float(straddle_thresh)
        self.crowd_thresh = float(crowd_thresh)
        self.score_thresh = float(score_thresh)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.size_divisibility = int(size_divisibility)
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}")
        self.loss_normalization = loss_normalization
        # Holds the train/test settings; it is also Detectron.pytorch's entry point for probabilities.
        self.RPN_GenerateProposals = GenerateProposals(anchor_generator, box_coder, pre_nms_top_n, post_nms_top_n,
                                                       nms_thresh, min_size, size_divisibility, min_size_strict)

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Optional[Sequence[float]] = None) -> "RPN":
        """Anchors from ``RPN.*`` / ``FPN.*`` (see :meth:`AnchorGenerator.from_cfg`), head width ``RPN.HEAD_DIM``,
        matching and sampling from ``TRAIN.RPN_*``, proposal settings from ``TRAIN.RPN_*`` / ``TEST.RPN_*``,
        ``MODEL.LEGACY_PLUS_ONE`` for the box convention, ``RPN.LOSS_NORMALIZATION`` for the loss divisors,
        ``RPN.{MIN_SIZE_STRICT, NMS_ON_LOGITS}`` for the proposal filter and ranking, ``SIZE_DIVISIBILITY``."""
        anchors = AnchorGenerator.from_cfg(cfg, spatial_scales)
        num = anchors.num_anchors_per_location()
        if len(set(num)) != 1:
            raise ValueError(f"the shared RPN head needs the same number of anchors on every level, got {num}")
        head = RPNHead(in_channels, num[0], None if int(cfg.RPN.HEAD_DIM) <= 0 else int(cfg.RPN.HEAD_DIM))
        legacy = bool(cfg.MODEL.LEGACY_PLUS_ONE)
        return cls(
            anchors, head, BoxCoder((1.0, 1.0, 1.0, 1.0), legacy_plus_one=legacy),
            Matcher(cfg.TRAIN.RPN_POSITIVE_OVERLAP, cfg.TRAIN.RPN_NEGATIVE_OVERLAP, allow_low_quality_matches=True),
            BalancedPositiveNegativeSampler(cfg.TRAIN.RPN_BATCH_SIZE_PER_IM, cfg.TRAIN.RPN_FG_FRACTION),
            pre_nms_top_n={"training": int(cfg.TRAIN.RPN_PRE_NMS_TOP_N), "testing": int(cfg.TEST.RPN_PRE_NMS_TOP_N)},
            post_nms_top_n={"training": int(cfg.TRAIN.RPN_POST_NMS_TOP_N),
                            "testing": int(cfg.TEST.RPN_POST_NMS_TOP_N)},
            nms_thresh={"training": float(cfg.TRAIN.RPN_NMS_THRESH), "testing": float(cfg.TEST.RPN_NMS_THRESH)},
            min_size={"training": float(cfg.TRAIN.RPN_MIN_SIZE), "testing": float(cfg.TEST.RPN_MIN_SIZE)},
            straddle_thresh=cfg.TRAIN.RPN_STRADDLE_THRESH, crowd_thresh=cfg.TRAIN.CROWD_FILTER_THRESH,
            loss_normalization=cfg.RPN.LOSS_NORMALIZATION, size_divisibility=int(cfg.SIZE_DIVISIBILITY),
            min_size_strict=bool(cfg.RPN.MIN_SIZE_STRICT), nms_on_logits=bool(cfg.RPN.NMS_ON_LOGITS),
        )

    # Detectron.pytorch names for the head's layers, so that `model.RPN.RPN_conv(x)` works as there. The
    # parameters live (and are saved) under `head.`.
    @property
    def RPN_conv(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_conv

    @property
    def RPN_cls_score(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_cls_score

    @property
    def RPN_bbox_pred(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_bbox_pred

    @property
    def pre_nms_top_n(self) -> Dict[str, int]:
        return self.RPN_GenerateProposals.pre_nms_top_n

    @property
    def post_nms_top_n(self) -> Dict[str, int]:
        return self.RPN_GenerateProposals.post_nms_top_n

    @property
    def nms_thresh(self) -> Dict[str, float]:
        return self.RPN_GenerateProposals.nms_thresh

    @property
    def min_size(self) -> Dict[str, float]:
        return self.RPN_GenerateProposals.min_size

    def forward(self, features: Union[Tensor, Sequence[Tensor]], image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None, batch_shape: Optional[Sequence[int]] = None
                ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        feats = [features] if isinstance(features, Tensor) else list(features)
        if len(image_sizes) != feats[0].shape[0]:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {feats[0].shape[0]} images")
        if batch_shape is None and getattr(self.anchor_generator, "strides", None) is None:
            batch_shape = padded_batch_shape(image_sizes, self.size_divisibility)
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(feats, batch_shape)
        gp = self.RPN_GenerateProposals
        proposals, _ = generate_proposals(objectness, deltas, anchors, image_sizes, gp.setting("pre_nms_top_n"),
                                          gp.setting("post_nms_top_n"), gp.setting("nms_thresh"),
                                          gp.setting("min_size"), self.box_coder, self.score_thresh,
                                          min_size_strict=self.min_size_strict, nms_on_logits=self.nms_on_logits)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets: one dict with 'boxes' (G, 4) per image")
            if len(targets) != len(image_sizes):
                raise ValueError(f"targets has {len(targets)} entries for a batch of {len(image_sizes)} images")
            for i, t in enumerate(targets):
                if "boxes" not in t:
                    raise ValueError(f"targets[{i}] has no 'boxes' (keys: {sorted(t)})")
            losses = rpn_losses(objectness, deltas, anchors, [t["boxes"] for t in targets], image_sizes,
                                self.matcher, self.sampler, self.box_coder, beta=self.smooth_l1_beta,
                                straddle_thresh=self.straddle_thresh,
                                crowd_boxes=[t.get("crowd_boxes") for t in targets], crowd_thresh=self.crowd_thresh,
                                normalization=self.loss_normalization)
        return proposals, losses
