"""How test-time augmentation merges the predictions of its runs: Detectron's heuristics, as pure functions.

Every run's predictions arrive already mapped back to one frame (the plain run's network input) and, for per-box
outputs, in the same box order, so merging is arithmetic on stacked tensors:

- boxes (:func:`merge_box_predictions`, ``TEST.BBOX_AUG.SCORE_HEUR`` / ``COORD_HEUR``): ``UNION`` concatenates the
  runs' RoIs (every RoI of every run becomes a candidate of the final NMS), ``AVG`` averages per RoI and ``ID``
  keeps the plain run's. ``AVG`` and ``ID`` need the same RoIs in every run (given proposals), and Detectron only
  allows ``UNION`` with both or neither.
- masks (:func:`merge_mask_probs`, ``TEST.MASK_AUG.HEUR``): per pixel of the ``M x M`` probabilities, ``SOFT_AVG``
  (mean), ``SOFT_MAX`` (maximum) or ``LOGIT_AVG`` (sigmoid of the mean logit, Detectron's ``logit`` with its
  ``1e-20`` floor).

- keypoints (:func:`merge_keypoint_heatmaps`, ``TEST.KPS_AUG.HEUR``): per cell of the ``K`` heatmaps (logits),
  ``HM_AVG`` (mean) or ``HM_MAX`` (maximum), before the arg-max that places each keypoint.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BOX_HEURISTICS", "KPS_HEURISTICS", "MASK_HEURISTICS", "merge_box_predictions", "merge_keypoint_heatmaps",
           "merge_mask_probs", "mask_logit"]

#: ``TEST.BBOX_AUG.SCORE_HEUR`` / ``COORD_HEUR`` values.
BOX_HEURISTICS = ("ID", "AVG", "UNION")
#: ``TEST.MASK_AUG.HEUR`` values.
MASK_HEURISTICS = ("SOFT_AVG", "SOFT_MAX", "LOGIT_AVG")
#: ``TEST.KPS_AUG.HEUR`` values.
KPS_HEURISTICS = ("HM_AVG", "HM_MAX")


def _merge(values: Sequence[Tensor], heur: str, identity_index: int, what: str, key: str) -> Tensor:
    if heur not in BOX_HEURISTICS:
        raise ValueError(f"{key} = {heur!r} is not known; use one of {BOX_HEURISTICS}")
    if not values:
        raise ValueError(f"no {what} to merge")
    if heur == "ID":
        return values[identity_index]
    if heur == "UNION":
        return torch.cat(list(values), dim=0)
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"{key} = 'AVG' needs the same RoIs in every augmentation, got {what} of shapes "
                         f"{sorted(shapes)}; RPN proposals differ per augmentation: use 'UNION'")
    return torch.stack(list(values)).mean(0)


def merge_box_predictions(scores: Sequence[Tensor], boxes: Sequence[Tensor], identity_index: int = -1,
                          score_heur: str = "UNION", coord_heur: str = "UNION") -> Tuple[Tensor, Tensor]:
    """Merge the per-RoI predictions of the augmentations of one image.

    Args:
        scores: per augmentation ``(R_t, K+1)`` class probabilities.
        boxes: per augmentation ``(R_t, 4(K+1))`` per-class boxes, all in the same frame.
        identity_index: which entry is the plain run (Detectron runs it last: ``-1``).
        score_heur, coord_heur: ``"UNION"``, ``"AVG"`` or ``"ID"``.

    Returns:
        ``(scores, boxes)``: ``(R, K+1)`` and ``(R, 4(K+1))`` with ``R = sum R_t`` (UNION) or ``R_t``.
    """
    if len(scores) != len(boxes):
        raise ValueError(f"got {len(scores)} score sets for {len(boxes)} box sets")
    if (score_heur == "UNION") != (coord_heur == "UNION"):
        raise ValueError(f"TEST.BBOX_AUG.SCORE_HEUR = {score_heur!r} with COORD_HEUR = {coord_heur!r}: 'UNION' "
                         f"merges scores and boxes together, set both to 'UNION' or neither")
    return (_merge(scores, score_heur, identity_index, "scores", "TEST.BBOX_AUG.SCORE_HEUR"),
            _merge(boxes, coord_heur, identity_index, "boxes", "TEST.BBOX_AUG.COORD_HEUR"))


def mask_logit(probs: Tensor) -> Tensor:
    """Detectron's ``logit``: ``-log((1 - p) / max(p, 1e-20))`` (``+inf`` at ``p = 1``)."""
    return -torch.log((1.0 - probs) / probs.clamp(min=1e-20))


def _stack_runs(outputs: Sequence[Tensor], what: str) -> Tensor:
    """``(T, ...)``: the per-box outputs of the ``T`` runs (same boxes, same order), which must share a shape."""
    if not outputs:
        raise ValueError(f"no {what} to merge")
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"{what} of every augmentation must have the same shape, got {sorted(shapes)}")
    return torch.stack(list(outputs))


def merge_mask_probs(masks: Sequence[Tensor], heur: str = "SOFT_AVG") -> Tensor:
    """Merge per-augmentation mask probabilities ``(N, C, M, M)`` (same boxes, same order) into one such tensor."""
    if heur not in MASK_HEURISTICS:
        raise ValueError(f"TEST.MASK_AUG.HEUR = {heur!r} is not known; use one of {MASK_HEURISTICS}")
    stacked = _stack_runs(masks, "masks")
    if heur == "SOFT_AVG":
        return stacked.mean(0)
    if heur == "SOFT_MAX":
        return stacked.amax(0)
    return torch.sigmoid(mask_logit(stacked).mean(0))


def merge_keypoint_heatmaps(heatmaps: Sequence[Tensor], heur: str = "HM_AVG") -> Tensor:
    """Merge per-augmentation keypoint heatmap logits ``(N, K, H, H)`` (same boxes and keypoint order) into one."""
    if heur not in KPS_HEURISTICS:
        raise ValueError(f"TEST.KPS_AUG.HEUR = {heur!r} is not known; use one of {KPS_HEURISTICS}")
    stacked = _stack_runs(heatmaps, "heatmaps")
    return stacked.mean(0) if heur == "HM_AVG" else stacked.amax(0)
