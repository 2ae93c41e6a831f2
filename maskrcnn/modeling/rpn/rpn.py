"""``RPN``: anchors, head, proposal generation and losses behind one module with Detectron's attribute names
(``RPN_conv``, ``RPN_cls_score``, ``RPN_bbox_pred``, ``RPN_GenerateProposals``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.matcher import Matcher
from ...ops.sampler import BalancedPositiveNegativeSampler
from .anchors import AnchorGenerator
from .head import RPNHead
from .loss import rpn_losses
from .proposals import GenerateProposals, generate_proposals

__all__ = ["RPN"]


def _per_mode(value) -> Dict[str, float]:
    if isinstance(value, dict):
        return {"training": value["training"], "testing": value["testing"]}
    return {"training": value, "testing": value}


class RPN(nn.Module):
    """Region Proposal Network.

    Args:
        anchor_generator: :class:`AnchorGenerator`.
        head: :class:`RPNHead` (or any module with the same outputs).
        box_coder: decodes/encodes anchor deltas (weights (1, 1, 1, 1)).
        matcher, sampler: anchor labelling and the balanced sample the losses use.
        pre_nms_top_n, post_nms_top_n, nms_thresh, min_size: a number, or ``{"training": .., "testing": ..}``.
        straddle_thresh: ignore anchors crossing the border by more than this (-1 keeps all).
        crowd_thresh: ignore anchors covered by a crowd region more than this.

    ``forward(features, image_sizes, targets=None, batch_shape=None)`` returns ``(proposals, losses)``:
    per image ``(P, 4)`` detached proposals (best first) and, in training, ``{"loss_rpn_cls", "loss_rpn_bbox"}``.
    ``targets`` are dicts with ``boxes`` and optional ``crowd_boxes``; ``batch_shape`` is the padded ``(H, W)``.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, box_coder: BoxCoder, matcher: Matcher,
                 sampler: BalancedPositiveNegativeSampler, pre_nms_top_n, post_nms_top_n, nms_thresh=0.7,
                 min_size=0.0, straddle_thresh: float = -1, crowd_thresh: float = 0.7, score_thresh: float = 0.0):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder
        self.matcher = matcher
        self.sampler = sampler
        self.straddle_thresh = float(straddle_thresh)
        self.crowd_thresh = float(crowd_thresh)
        self.score_thresh = float(score_thresh)
        self.RPN_GenerateProposals = GenerateProposals(anchor_generator, box_coder, _per_mode(pre_nms_top_n),
                                                       _per_mode(post_nms_top_n), _per_mode(nms_thresh),
                                                       _per_mode(min_size))

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Optional[Sequence[float]] = None) -> "RPN":
        anchors = AnchorGenerator.from_cfg(cfg, spatial_scales)
        num = anchors.num_anchors_per_location()
        if len(set(num)) != 1:
            raise ValueError(f"every RPN level needs the same number of anchors per location, got {num}")
        head = RPNHead(in_channels, num[0], None if cfg.RPN.HEAD_DIM <= 0 else cfg.RPN.HEAD_DIM)
        legacy = bool(cfg.MODEL.LEGACY_PLUS_ONE)
        return cls(
            anchors, head, BoxCoder((1.0, 1.0, 1.0, 1.0), legacy_plus_one=legacy),
            Matcher(cfg.TRAIN.RPN_POSITIVE_OVERLAP, cfg.TRAIN.RPN_NEGATIVE_OVERLAP, allow_low_quality_matches=True),
            BalancedPositiveNegativeSampler(cfg.TRAIN.RPN_BATCH_SIZE_PER_IM, cfg.TRAIN.RPN_FG_FRACTION),
            pre_nms_top_n={"training": cfg.TRAIN.RPN_PRE_NMS_TOP_N, "testing": cfg.TEST.RPN_PRE_NMS_TOP_N},
            post_nms_top_n={"training": cfg.TRAIN.RPN_POST_NMS_TOP_N, "testing": cfg.TEST.RPN_POST_NMS_TOP_N},
            nms_thresh={"training": cfg.TRAIN.RPN_NMS_THRESH, "testing": cfg.TEST.RPN_NMS_THRESH},
            min_size={"training": cfg.TRAIN.RPN_MIN_SIZE, "testing": cfg.TEST.RPN_MIN_SIZE},
            straddle_thresh=cfg.TRAIN.RPN_STRADDLE_THRESH, crowd_thresh=cfg.TRAIN.CROWD_FILTER_THRESH,
        )

    # Detectron.pytorch names for the head's layers: `model.RPN.RPN_conv(x)` works as there.
    @property
    def RPN_conv(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_conv

    @property
    def RPN_cls_score(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_cls_score

    @property
    def RPN_bbox_pred(self) -> nn.Module:  # noqa: N802
        return self.head.RPN_bbox_pred

    def _setting(self, name: str):
        return getattr(self.RPN_GenerateProposals, name)["training" if self.training else "testing"]

    def forward(self, features: Union[Tensor, Sequence[Tensor]], image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None, batch_shape: Optional[Sequence[int]] = None
                ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        feats = [features] if isinstance(features, Tensor) else list(features)
        if batch_shape is None:
            batch_shape = _padded_shape(image_sizes)
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(feats, batch_shape)
        proposals, _ = generate_proposals(objectness, deltas, anchors, image_sizes, self._setting("pre_nms_top_n"),
                                          self._setting("post_nms_top_n"), self._setting("nms_thresh"),
                                          self._setting("min_size"), self.box_coder, self.score_thresh)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets with 'boxes'")
            losses = rpn_losses(objectness, deltas, anchors, [t["boxes"] for t in targets], image_sizes,
                                self.matcher, self.sampler, self.box_coder, straddle_thresh=self.straddle_thresh,
                                crowd_boxes=[t.get("crowd_boxes") for t in targets], crowd_thresh=self.crowd_thresh)
        return proposals, losses


def _padded_shape(image_sizes: Sequence[Tuple[int, int]], divisibility: int = 32) -> Tuple[int, int]:
    h = max(int(s[0]) for s in image_sizes)
    w = max(int(s[1]) for s in image_sizes)
    return (-(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility)
