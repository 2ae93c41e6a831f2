"""The RPN head: a shared 3x3 conv, then per-anchor objectness logits and box deltas on every level."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RPNHead"]


class RPNHead(nn.Module):
    """Detectron's single-conv RPN head, shared across FPN levels.

    Args:
        in_channels: channels of every input level.
        num_anchors: anchors per location (A).
        conv_dim: channels of ``RPN_conv``; ``None`` keeps ``in_channels``.

    ``forward(features)`` takes a ``(N, C, H, W)`` tensor or a list of them and returns two lists, one entry per
    level: objectness logits ``(N, A, H, W)`` and box deltas ``(N, 4A, H, W)`` (dx, dy, dw, dh per anchor).
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_dim: Optional[int] = None):
        super().__init__()
        conv_dim = in_channels if conv_dim is None or conv_dim <= 0 else conv_dim
        self.RPN_conv = nn.Conv2d(in_channels, conv_dim, kernel_size=3, stride=1, padding=1)
        self.RPN_cls_score = nn.Conv2d(conv_dim, num_anchors, kernel_size=1)
        self.RPN_bbox_pred = nn.Conv2d(conv_dim, 4 * num_anchors, kernel_size=1)
        for layer in (self.RPN_conv, self.RPN_cls_score, self.RPN_bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: Union[Tensor, Sequence[Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        if isinstance(features, Tensor):
            features = [features]
        logits, deltas = [], []
        for f in features:
            t = F.relu(self.RPN_conv(f))
            logits.append(self.RPN_cls_score(t))
            deltas.append(self.RPN_bbox_pred(t))
        return logits, deltas
