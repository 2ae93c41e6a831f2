"""Bounding-box voting (Gidaris & Komodakis, https://arxiv.org/abs/1505.01749), as Detectron's ``box_voting``.

Every detection that survived NMS is replaced by the score-weighted average of all candidates of its class (before
NMS) that overlap it with IoU ``>= vote_thresh`` — itself included — and may get a new score from those voters
(Detectron's ``TEST.BBOX_VOTE.SCORING_METHOD``; ``p_i`` are the voters' scores, ``n`` their number):

========================  =====================================================================================
``ID``                    the detection keeps its score
``TEMP_AVG``              mean of ``p_i^(1/beta) / (p_i^(1/beta) + (1 - p_i)^(1/beta))`` (temperature ``beta``)
``AVG``                   mean of ``p_i``
``IOU_AVG``               mean of ``p_i`` weighted by each voter's IoU with the detection
``GENERALIZED_AVG``       ``(mean of p_i^beta)^(1/beta)``
``QUASI_SUM``             ``sum of p_i / n^beta``
========================  =====================================================================================

Boxes are ``(N, 4)`` ``x1, y1, x2, y2``; IoUs use the continuous convention unless ``legacy_plus_one``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from .boxes import box_iou

__all__ = ["box_voting", "BoxVoting", "BOX_VOTING_METHODS"]

#: Detectron's scoring methods (``TEST.BBOX_VOTE.SCORING_METHOD``).
BOX_VOTING_METHODS = ("ID", "TEMP_AVG", "AVG", "IOU_AVG", "GENERALIZED_AVG", "QUASI_SUM")


def _vote_scores(method: str, top_scores: Tensor, scores: Tensor, voters: Tensor, iou: Tensor, beta: float
                 ) -> Tensor:
    """New scores ``(D,)`` of ``D`` detections from the scores ``(C,)`` of ``C`` candidates, ``voters`` ``(D, C)``
    a 0/1 float mask and ``iou`` ``(D, C)`` their overlaps."""
    n = voters.sum(1)
    if method == "ID":
        return top_scores
    if method == "AVG":
        return (voters * scores).sum(1) / n
    if method == "TEMP_AVG":
        # softmax over (p, 1 - p) of log-probabilities divided by beta = sigmoid of the scaled log-odds.
        tempered = torch.sigmoid((torch.log(scores) - torch.log1p(-scores)) / beta)
        return (voters * tempered).sum(1) / n
    if method == "IOU_AVG":
        w = voters * iou
        return (w * scores).sum(1) / w.sum(1)
    if method == "GENERALIZED_AVG":
        return ((voters * scores.pow(beta)).sum(1) / n).pow(1.0 / beta)
    if method == "QUASI_SUM":
        return (voters * scores).sum(1) / n.pow(beta)
    raise ValueError(f"unknown box voting scoring method {method!r}; use one of {BOX_VOTING_METHODS} "
                     f"(TEST.BBOX_VOTE.SCORING_METHOD)")


def box_voting(top_boxes: Tensor, top_scores: Tensor, top_labels: Tensor, all_boxes: Tensor, all_scores: Tensor,
               all_labels: Tensor, vote_thresh: float, scoring_method: str = "ID", beta: float = 1.0,
               legacy_plus_one: bool = False) -> Tuple[Tensor, Tensor]:
    """Refine the detections ``top_*`` by voting with the candidates ``all_*`` of the same label.

    Args:
        top_boxes, top_scores, top_labels: ``(D, 4)``, ``(D,)``, ``(D,)`` the detections kept by NMS.
        all_boxes, all_scores, all_labels: ``(C, 4)``, ``(C,)``, ``(C,)`` the candidates NMS ran on (scores
            above the threshold, > 0); every detection is normally one of them, so it votes for itself.
        vote_thresh: candidates overlapping a detection with IoU ``>= vote_thresh`` vote (``TEST.BBOX_VOTE.VOTE_TH``).
        scoring_method: one of :data:`BOX_VOTING_METHODS`; beta: its parameter (``SCORING_METHOD_BETA``).
        legacy_plus_one: Detectron's ``+1`` widths in the IoU.

    Returns:
        ``(boxes (D, 4), scores (D,))``: the voted boxes and scores, in the detections' order and dtype. A detection
        without any voter (only when it is not among the candidates) keeps its box and score.
    """
    if scoring_method not in BOX_VOTING_METHODS:
        raise ValueError(f"unknown box voting scoring method {scoring_method!r}; use one of {BOX_VOTING_METHODS} "
                         f"(TEST.BBOX_VOTE.SCORING_METHOD)")
    if not float(beta) > 0:
        raise ValueError(f"box voting beta must be > 0, got {beta!r} (TEST.BBOX_VOTE.SCORING_METHOD_BETA)")
    out_boxes, out_scores = top_boxes.clone(), top_scores.clone()
    if top_boxes.shape[0] == 0 or all_boxes.shape[0] == 0:
        return out_boxes, out_scores
    # One class at a time, as Detectron does: the IoU matrices stay per-class small.
    for label in torch.unique(top_labels).tolist():
        t = torch.nonzero(top_labels == label).squeeze(1)
        a = torch.nonzero(all_labels == label).squeeze(1)
        if a.numel() == 0:
            continue
        boxes, scores = all_boxes[a].float(), all_scores[a].float()
        iou = box_iou(top_boxes[t].float(), boxes, legacy_plus_one=legacy_plus_one)
        voters = (iou >= float(vote_thresh)).to(scores.dtype)
        has = voters.sum(1) > 0
        weights = voters * scores
        voted = (weights @ boxes) / weights.sum(1, keepdim=True)
        new_scores = _vote_scores(scoring_method, top_scores[t].float(), scores, voters, iou, float(beta))
        out_boxes[t[has]] = voted[has].to(out_boxes.dtype)
        out_scores[t[has]] = new_scores[has].to(out_scores.dtype)
    return out_boxes, out_scores


@dataclass(frozen=True)
class BoxVoting:
    """Box-voting settings (Detectron's ``TEST.BBOX_VOTE``), callable as :func:`box_voting` with them.

    Attributes: ``vote_thresh`` (``VOTE_TH``), ``scoring_method`` (``SCORING_METHOD``), ``beta``
    (``SCORING_METHOD_BETA``), ``legacy_plus_one`` (the IoU convention).
    """

    vote_thresh: float = 0.8
    scoring_method: str = "ID"
    beta: float = 1.0
    legacy_plus_one: bool = False

    def __post_init__(self):
        if self.scoring_method not in BOX_VOTING_METHODS:
            raise ValueError(f"unknown box voting scoring method {self.scoring_method!r}; use one of "
                             f"{BOX_VOTING_METHODS} (TEST.BBOX_VOTE.SCORING_METHOD)")
        if not 0.0 <= float(self.vote_thresh) <= 1.0:
            raise ValueError(f"box voting threshold must be in [0, 1], got {self.vote_thresh!r} "
                             f"(TEST.BBOX_VOTE.VOTE_TH)")
        if not float(self.beta) > 0:
            raise ValueError(f"box voting beta must be > 0, got {self.beta!r} (TEST.BBOX_VOTE.SCORING_METHOD_BETA)")

    @property
    def keeps_scores(self) -> bool:
        """Whether voting leaves the scores (hence the ranking of the detections) unchanged."""
        return self.scoring_method == "ID"

    def __call__(self, top_boxes: Tensor, top_scores: Tensor, top_labels: Tensor, all_boxes: Tensor,
                 all_scores: Tensor, all_labels: Tensor) -> Tuple[Tensor, Tensor]:
        return box_voting(top_boxes, top_scores, top_labels, all_boxes, all_scores, all_labels, self.vote_thresh,
                          self.scoring_method, self.beta, self.legacy_plus_one)
