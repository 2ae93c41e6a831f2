"""The RPN head: a 3x3 conv + ReLU, then per-anchor objectness logits and box deltas, shared by every level."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activation import relu_after

__all__ = ["RPNHead"]


class RPNHead(nn.Module):
    """Detectron's single-conv RPN head (torchvision's ``RPNHead`` with one conv), shared across FPN levels.

    Args:
        in_channels: channels of every input level.
        num_anchors: anchors per location (A).
        conv_dim: output channels of ``RPN_conv``; ``None`` (or <= 0, Detectron's -1) keeps ``in_channels``.

    Layers (Detectron.pytorch names; torchvision's in brackets): ``RPN_conv`` 3x3 pad 1 (``conv.0.0``),
    ``RPN_cls_score`` 1x1 -> A (``cls_logits``), ``RPN_bbox_pred`` 1x1 -> 4A (``bbox_pred``); weights
    N(0, 0.01), biases 0. The two predictors carry ``fp32_island = True``: under mixed precision they run in fp32.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_dim: Optional[int] = None):
        super().__init__()
        if int(in_channels) <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if int(num_anchors) <= 0:
            raise ValueError(f"num_anchors must be positive, got {num_anchors}")
        conv_dim = int(in_channels) if conv_dim is None or int(conv_dim) <= 0 else int(conv_dim)
        self.in_channels, self.num_anchors, self.conv_dim = int(in_channels), int(num_anchors), conv_dim
        self.RPN_conv = nn.Conv2d(self.in_channels, conv_dim, kernel_size=3, stride=1, padding=1)
        self.RPN_cls_score = nn.Conv2d(conv_dim, self.num_anchors, kernel_size=1)
        self.RPN_bbox_pred = nn.Conv2d(conv_dim, 4 * self.num_anchors, kernel_size=1)
        for layer in (self.RPN_conv, self.RPN_cls_score, self.RPN_bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)
        # fp32 islands under mixed precision (maskrcnn.engine.speed.enable_amp): proposal ranking, box decoding
        # and NMS read these logits and deltas, and bf16's 8-bit mantissa would tie scores and shift boxes.
        self.RPN_cls_score.fp32_island = True
        self.RPN_bbox_pred.fp32_island = True

    def forward(self, features: Union[Tensor, Sequence[Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        """``features``: a ``(N, C, H, W)`` tensor or a list of them (one per level).

        Returns two lists with one entry per level: objectness logits ``(N, A, H, W)`` and box deltas
        ``(N, 4A, H, W)`` laid out anchor-major (``dx, dy, dw, dh`` of anchor ``a`` at channels ``4a..4a+3``).
        """
        feats = [features] if isinstance(features, Tensor) else list(features)
        if len(feats) == 0:
            raise ValueError("RPNHead got an empty list of features")
        logits, deltas = [], []
        # Training: both predictors as one convolution, so that backward produces one gradient for ``t`` instead
        # of two plus their sum (at P2 of an 800x1066 batch of 2, 3 x 106 MB: the peak of the whole step).
        # Inference keeps the two modules (their fp32-island hooks under bf16 inference).
        fused = self.training and torch.is_grad_enabled()
        if fused:
            num_logits = self.RPN_cls_score.out_channels
            weight = torch.cat([self.RPN_cls_score.weight, self.RPN_bbox_pred.weight])
            bias = torch.cat([self.RPN_cls_score.bias, self.RPN_bbox_pred.bias])
        for i, f in enumerate(feats):
            if f.dim() != 4 or f.shape[1] != self.in_channels:
                raise ValueError(f"features[{i}] must be (N, {self.in_channels}, H, W), got shape {tuple(f.shape)}")
            t = relu_after(self.RPN_conv(f), f)
            if fused:
                out = F.conv2d(t, weight, bias)
                logits.append(out[:, :num_logits])
                deltas.append(out[:, num_logits:])
            else:
                if torch.is_autocast_enabled(t.device.type) and t.dtype != self.RPN_cls_score.weight.dtype:
                    # Under mixed precision both predictors are fp32 islands, whose hooks would each cast ``t`` (at
                    # P2 of an 800x1066 image, 14M values, about 10 ms each: benchmarks/profile_call.py): cast it once
                    # here. Exact both ways (bf16/fp16 -> fp32), so a plain autocast without the islands computes
                    # the same.
                    t = t.to(self.RPN_cls_score.weight.dtype)
                logits.append(self.RPN_cls_score(t))
                deltas.append(self.RPN_bbox_pred(t))
        return logits, deltas
