"""``Box_Outs``: Fast R-CNN classification and box regression layers, and their losses.

:class:`FastRCNNOutputs` is Detectron's ``fast_rcnn_outputs`` (torchvision's ``FastRCNNPredictor``): ``cls_score``
gives ``K + 1`` logits (column 0 is the background) and ``bbox_pred`` gives ``(dx, dy, dw, dh)`` deltas per class,
``4 (K + 1)`` columns; with class-agnostic regression Detectron predicts two boxes (background, foreground), so 8
columns. Deltas are relative to the RoI, in the box coder's weighted parameterisation.

:func:`fast_rcnn_losses` is torchvision's ``fastrcnn_loss``: mean cross entropy over the sampled RoIs, and smooth L1
(beta 1/9) summed over the deltas of each foreground RoI's own class, divided by the number of sampled RoIs.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops.losses import smooth_l1_loss

__all__ = ["FastRCNNOutputs", "fast_rcnn_losses"]


class FastRCNNOutputs(nn.Module):
    """Classifier and box regressor on RoI features.

    Args:
        dim_in: feature width (1024 for the 2-MLP head, 2048 for the C4 head).
        num_classes: classes including the background (``MODEL.NUM_CLASSES``, K + 1).
        cls_agnostic_bbox_reg: one (foreground) box per RoI; ``bbox_pred`` then has 8 outputs as in Detectron
            (the background pair is unused).

    ``forward(x (R, dim_in) or (R, dim_in, 1, 1)) -> (cls_score (R, K+1), bbox_pred (R, 4(K+1)) or (R, 8))``.
    Init (Detectron): ``cls_score`` normal std 0.01, ``bbox_pred`` normal std 0.001, biases 0.

    ``fp32_island``: under mixed precision the module runs in fp32 (:func:`maskrcnn.engine.speed.enable_amp`), so
    that score thresholds, box decoding and NMS see fp32 logits and deltas.
    """

    fp32_island = True

    def __init__(self, dim_in: int, num_classes: int, cls_agnostic_bbox_reg: bool = False):
        super().__init__()
        if dim_in < 1:
            raise ValueError(f"dim_in must be positive, got {dim_in}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_agnostic_bbox_reg = bool(cls_agnostic_bbox_reg)
        self.cls_score = nn.Linear(dim_in, num_classes)
        self.bbox_pred = nn.Linear(dim_in, 4 * (2 if cls_agnostic_bbox_reg else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    @classmethod
    def from_cfg(cls, cfg, dim_in: int) -> "FastRCNNOutputs":
        """Keys: ``MODEL.NUM_CLASSES``, ``MODEL.CLS_AGNOSTIC_BBOX_REG``."""
        return cls(dim_in, cfg.MODEL.NUM_CLASSES, cfg.MODEL.CLS_AGNOSTIC_BBOX_REG)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() == 4:
            if x.shape[2:] != (1, 1):
                raise ValueError(f"4-D input must be (R, C, 1, 1), got shape {tuple(x.shape)}")
            x = x.flatten(start_dim=1)
        if x.dim() != 2:
            raise ValueError(f"x must be (R, {self.cls_score.in_features}) features, got shape {tuple(x.shape)}")
        return self.cls_score(x), self.bbox_pred(x)


def _cat(t: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    return t if isinstance(t, Tensor) else torch.cat(list(t), dim=0)


def fast_rcnn_losses(cls_score: Tensor, bbox_pred: Tensor, labels: Union[Tensor, Sequence[Tensor]],
                     regression_targets: Union[Tensor, Sequence[Tensor]], beta: float = 1.0 / 9
                     ) -> Tuple[Tensor, Tensor]:
    """Classification and box regression losses of the sampled RoIs.

    Args:
        cls_score: ``(R, K+1)`` logits.
        bbox_pred: ``(R, 4(K+1))`` per-class deltas, ``(R, 8)`` (Detectron's class-agnostic layout, the
            foreground box in columns 4..7) or ``(R, 4)``.
        labels: ``(R,)`` int64 in ``0..K`` (0 background), or a per-image list to concatenate.
        regression_targets: ``(R, 4)`` encoded targets (or a per-image list).
        beta: smooth L1 transition point (torchvision 1/9).

    Returns:
        ``(loss_cls, loss_bbox)`` 0-d tensors. With ``R == 0`` both are 0, still connected to the inputs'
        graph (torchvision would give NaN).
    """
    labels = _cat(labels)
    regression_targets = _cat(regression_targets)
    num_rois, num_classes = cls_score.shape
    if labels.shape != (num_rois,):
        raise ValueError(f"labels must be ({num_rois},) to match cls_score {tuple(cls_score.shape)}, "
                         f"got {tuple(labels.shape)}")
    if regression_targets.shape != (num_rois, 4):
        raise ValueError(f"regression_targets must be ({num_rois}, 4), got {tuple(regression_targets.shape)}")
    width = bbox_pred.shape[-1]
    if bbox_pred.dim() != 2 or bbox_pred.shape[0] != num_rois or width not in (4, 8, 4 * num_classes):
        raise ValueError(f"bbox_pred must be ({num_rois}, {4 * num_classes}), ({num_rois}, 8) or ({num_rois}, 4), "
                         f"got {tuple(bbox_pred.shape)}")
    if num_rois == 0:
        zero = cls_score.sum() * 0 + bbox_pred.sum() * 0
        return zero, zero.clone()
    labels = labels.to(torch.int64)

    loss_cls = F.cross_entropy(cls_score, labels)

    fg = torch.nonzero(labels > 0).squeeze(1)
    fg_labels = labels[fg]
    deltas = bbox_pred.reshape(num_rois, width // 4, 4)
    if width == 4:
        column = torch.zeros_like(fg_labels)
    elif width == 8 and num_classes != 2:
        column = torch.ones_like(fg_labels)
    else:
        column = fg_labels
    loss_bbox = smooth_l1_loss(deltas[fg, column], regression_targets[fg].to(deltas.dtype), beta=beta,
                               reduction="sum") / labels.numel()
    return loss_cls, loss_bbox
