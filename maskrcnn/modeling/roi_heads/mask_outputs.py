"""``Mask_Outs``: per-class mask logits (Detectron's ``mask_rcnn_outputs``), the mask loss and mask probabilities.

:class:`MaskRCNNOutputs` is a 1x1 convolution ``mask_fcn_logits`` from the mask head's ``(R, dim, M, M)`` features to
``(R, K+1, M, M)`` logits (``(R, 1, M, M)`` class-agnostic), torchvision's ``MaskRCNNPredictor.mask_fcn_logits``.

:func:`mask_rcnn_loss` is torchvision's ``maskrcnn_loss`` given ready-made targets: binary cross entropy with logits
between each RoI's mask of its own class and its ``M x M`` target, averaged over all pixels of all RoIs.
:func:`mask_dice_loss` is a soft Dice loss on the same inputs, which ``ROIHeads`` adds to it when
``MRCNN.DICE_LOSS_WEIGHT`` is set.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_head import init_conv

__all__ = ["MaskRCNNOutputs", "mask_rcnn_loss", "mask_dice_loss", "mask_probs_for_labels"]


class MaskRCNNOutputs(nn.Module):
    """Mask logits.

    Args:
        dim_in: channels of the mask head output (``MRCNN.DIM_REDUCED``).
        num_classes: classes including the background (``MODEL.NUM_CLASSES``).
        cls_specific: one mask per class (``MRCNN.CLS_SPECIFIC_MASK``); False gives a single mask.
        conv_init: ``"MSRAFill"`` (He normal fan_out, torchvision's ``MaskRCNNPredictor``) or ``"GaussianFill"``
            (std 0.001); bias 0.

    ``forward(x (R, dim_in, M, M)) -> (R, K+1 or 1, M, M)`` logits.

    ``fp32_output``: under mixed precision the convolution runs in the autocast dtype and its logits are cast to
    fp32 before anything reads them (:func:`maskrcnn.engine.speed.enable_amp`), so that the sigmoid and the
    binarisation threshold see fp32 values.
    """

    fp32_output = True

    def __init__(self, dim_in: int, num_classes: int, cls_specific: bool = True, conv_init: str = "MSRAFill"):
        super().__init__()
        if dim_in < 1:
            raise ValueError(f"dim_in must be positive, got {dim_in}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_specific = bool(cls_specific)
        self.mask_fcn_logits = nn.Conv2d(dim_in, num_classes if cls_specific else 1, 1)
        init_conv(self.mask_fcn_logits, conv_init)

    @classmethod
    def from_cfg(cls, cfg, dim_in: int) -> "MaskRCNNOutputs":
        """Keys: ``MODEL.NUM_CLASSES``, ``MRCNN.{CLS_SPECIFIC_MASK, CONV_INIT}``."""
        return cls(dim_in, cfg.MODEL.NUM_CLASSES, cfg.MRCNN.CLS_SPECIFIC_MASK, cfg.MRCNN.CONV_INIT)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (R, {self.mask_fcn_logits.in_channels}, M, M), got shape {tuple(x.shape)}")
        return self.mask_fcn_logits(x)

    def label_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """``(R, 1, M, M)`` fp32 logits of each RoI's own class: ``forward(x)[r, labels[r]]`` without the other
        classes' channels (at inference only the detected class's mask is read: with 81 classes that is 1/81 of the
        1x1 convolution's work). ``labels`` ``(R,)`` int64 in ``[0, K]``; a class-agnostic head gives its one mask.
        A batched matrix-vector product with each RoI's weight row; under autocast in its dtype, like the
        convolution."""
        conv = self.mask_fcn_logits
        if x.dim() != 4:
            raise ValueError(f"x must be (R, {conv.in_channels}, M, M), got shape {tuple(x.shape)}")
        if not self.cls_specific or type(conv) is not nn.Conv2d:  # one channel, or a layer replaced (quantized)
            return _label_channel(self(x), labels, "label_logits").float()[:, None]
        num_rois, c, h, w = x.shape
        labels = _checked_labels(labels.to(x.device), num_rois, conv.out_channels, "label_logits")
        weight = conv.weight.reshape(conv.out_channels, c)[labels]  # (R, C)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = torch.bmm(x.permute(0, 2, 3, 1).reshape(num_rois, h * w, c), weight[:, :, None])  # (R, HW, 1)
        else:
            out = torch.bmm(weight[:, None, :], x.reshape(num_rois, c, h * w))  # (R, 1, HW)
        out = out.float().view(num_rois, 1, h, w)
        if conv.bias is not None:
            out = out + conv.bias[labels].float().view(num_rois, 1, 1, 1)
        return out


def _checked_labels(labels: Tensor, num_rois: int, channels: int, fn: str) -> Tensor:
    """``labels`` as int64, after checking it is ``(num_rois,)`` with values in ``[0, channels)``."""
    if labels.shape != (num_rois,):
        raise ValueError(f"{fn}: labels must be ({num_rois},) to match mask_logits, got {tuple(labels.shape)}")
    labels = labels.to(dtype=torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= channels):
        raise ValueError(f"{fn}: labels must be in [0, {channels}), got min {int(labels.min())} "
                         f"max {int(labels.max())}")
    return labels


def _label_channel(mask_logits: Tensor, labels: Tensor, fn: str) -> Tensor:
    """``(R, M, M)``: each RoI's logits of its own class (channel 0 when class-agnostic)."""
    if mask_logits.dim() != 4:
        raise ValueError(f"{fn}: mask_logits must be (R, C, M, M), got shape {tuple(mask_logits.shape)}")
    num_rois, channels = mask_logits.shape[:2]
    if channels == 1:
        if labels.shape != (num_rois,):
            raise ValueError(f"{fn}: labels must be ({num_rois},) to match mask_logits, got {tuple(labels.shape)}")
        return mask_logits[:, 0]
    labels = _checked_labels(labels.to(mask_logits.device), num_rois, channels, fn)
    return mask_logits[torch.arange(num_rois, device=mask_logits.device), labels]


def _loss_inputs(mask_logits: Tensor, labels: Union[Tensor, Sequence[Tensor]],
                 mask_targets: Union[Tensor, Sequence[Tensor]], fn: str) -> Tuple[Tensor, Tensor]:
    """``(R, M, M)`` logits of each RoI's own class and its ``(R, M, M)`` targets, per-image lists concatenated."""
    labels = labels if isinstance(labels, Tensor) else torch.cat(list(labels))
    mask_targets = mask_targets if isinstance(mask_targets, Tensor) else torch.cat(list(mask_targets))
    if mask_targets.dim() != 3 or mask_targets.shape[0] != mask_logits.shape[0] or \
            mask_targets.shape[1:] != mask_logits.shape[2:]:
        raise ValueError(f"{fn}: mask_targets must be ({mask_logits.shape[0]}, {mask_logits.shape[2]}, "
                         f"{mask_logits.shape[3] if mask_logits.dim() == 4 else '?'}), got {tuple(mask_targets.shape)}")
    return _label_channel(mask_logits, labels, fn), mask_targets


def mask_rcnn_loss(mask_logits: Tensor, labels: Union[Tensor, Sequence[Tensor]],
                   mask_targets: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """Mask loss of the foreground RoIs.

    Args:
        mask_logits: ``(R, K+1 or 1, M, M)``.
        labels: ``(R,)`` classes in 1..K of the RoIs (or a per-image list).
        mask_targets: ``(R, M, M)`` targets in [0, 1] (e.g. ``project_masks_on_boxes``; or a per-image list).

    Returns:
        0-d mean BCE-with-logits; with ``R == 0``, ``0 * mask_logits.sum()`` so the graph stays connected.
    """
    logits, mask_targets = _loss_inputs(mask_logits, labels, mask_targets, "mask_rcnn_loss")
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype))


def mask_dice_loss(mask_logits: Tensor, labels: Union[Tensor, Sequence[Tensor]],
                   mask_targets: Union[Tensor, Sequence[Tensor]], eps: float = 1.0) -> Tensor:
    """Soft Dice loss of the foreground RoIs' masks, ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` per RoI
    (``p`` the sigmoid of its own class's logits, ``t`` its target), averaged over the RoIs.

    Binary cross entropy averages over every pixel of the ``M x M`` box, so a thin or hollow object, a few percent of
    its box, weighs little against its background; Dice scores the overlap itself, whatever the object's share of
    the box. Same arguments and shapes as :func:`mask_rcnn_loss`; with ``R == 0``, ``0 * mask_logits.sum()``.
    """
    logits, mask_targets = _loss_inputs(mask_logits, labels, mask_targets, "mask_dice_loss")
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    probs = logits.float().sigmoid().flatten(1)
    targets = mask_targets.to(probs.dtype).flatten(1)
    dice = (2 * (probs * targets).sum(1) + eps) / (probs.sum(1) + targets.sum(1) + eps)
    return (1 - dice).mean()


def mask_probs_for_labels(mask_logits: Tensor, labels: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``(R, 1, M, M)`` sigmoid probabilities of each RoI's mask for its label (the only mask when class-agnostic)."""
    labels = labels if isinstance(labels, Tensor) else torch.cat(list(labels))
    return _label_channel(mask_logits, labels, "mask_probs_for_labels").sigmoid()[:, None]
