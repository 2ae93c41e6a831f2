"""Feature Pyramid Network (Lin et al., 2017) on top of a bottom-up body, as in Detectron and torchvision.

For inputs ``C_2..C_k`` (finest first)::

    inner_k = lateral_k(C_k)
    inner_i = lateral_i(C_i) + upsample_nearest(inner_{i+1}, size of C_i)        i = k-1 .. 2
    P_i     = output_i(inner_i)                                                 3x3 conv
    P_{k+1} = max_pool2d(P_k, kernel 1, stride 2)                               top_block="maxpool" only

The upsampling goes to the lateral's exact size (``F.interpolate(size=...)``, as torchvision does) rather than a
fixed factor 2, so inputs whose sides are not multiples of 32 still line up.

Initialisation is torchvision's: ``kaiming_uniform_(a=1)`` weights (uniform with bound ``sqrt(3 / fan_in)``, which is
exactly Caffe2's ``XavierFill`` used by Detectron) and zero biases; ``zero_init_lateral`` zeroes the lateral convs
as Detectron's ``FPN.ZERO_INIT_LATERAL`` does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .norms import group_norm

__all__ = ["FPN"]


def _conv_block(in_ch: int, out_ch: int, k: int, use_gn: bool) -> nn.Module:
    if not use_gn:
        return nn.Conv2d(in_ch, out_ch, k, padding=k // 2)
    try:
        norm = group_norm(out_ch)
    except ValueError as e:
        raise ValueError(f"FPN use_gn=True with out_channels={out_ch}: {e}") from None
    # GroupNorm supplies the shift, so the conv has no bias (Detectron's ConvGN).
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), norm)


def _first_conv(block: nn.Module) -> nn.Conv2d:
    return block if isinstance(block, nn.Conv2d) else block[0]


class FPN(nn.Module):
    """Top-down pyramid with lateral connections.

    Args:
        in_channels_list: channels of the input maps, finest first (e.g. ``[256, 512, 1024, 2048]`` for res2..res5).
        out_channels: channels of every output level (Detectron's ``FPN.DIM``).
        use_gn: GroupNorm (32 groups) after every lateral and output conv; the convs then have no bias and each
            ``lateral_convs[i]`` / ``output_convs[i]`` is ``Sequential(conv, GroupNorm)`` instead of a conv.
        zero_init_lateral: zero-initialise the lateral 1x1 convs.
        top_block: ``"maxpool"`` adds one coarser level (P6 from P5, stride 2 subsampling); ``None`` adds nothing.

    ``forward(features: list of (N, C_i, H_i, W_i), finest first) -> list of (N, out_channels, H_i, W_i)`` in the
    same order, plus ``(N, out_channels, ceil(H_k/2), ceil(W_k/2))`` at the end with ``top_block="maxpool"``.
    Attributes: ``lateral_convs``, ``output_convs`` (``nn.ModuleList``, finest first), ``out_channels``,
    ``num_outputs``.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int = 256, use_gn: bool = False,
                 zero_init_lateral: bool = False, top_block: Optional[str] = "maxpool"):
        super().__init__()
        in_channels_list = [int(c) for c in in_channels_list]
        if not in_channels_list or any(c <= 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list={in_channels_list!r} must be a non-empty list of positive ints")
        if out_channels <= 0:
            raise ValueError(f"out_channels={out_channels!r} must be positive")
        if top_block not in ("maxpool", None):
            raise ValueError(f"top_block={top_block!r} must be 'maxpool' or None")
        self.in_channels_list = in_channels_list
        self.out_channels = int(out_channels)
        self.top_block = top_block
        self.num_outputs = len(in_channels_list) + (1 if top_block == "maxpool" else 0)
        self.lateral_convs = nn.ModuleList(_conv_block(c, out_channels, 1, use_gn) for c in in_channels_list)
        self.output_convs = nn.ModuleList(_conv_block(out_channels, out_channels, 3, use_gn) for _ in in_channels_list)

        for block in list(self.lateral_convs) + list(self.output_convs):
            conv = _first_conv(block)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        if zero_init_lateral:
            for block in self.lateral_convs:
                nn.init.zeros_(_first_conv(block).weight)

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        features = list(features)
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN was built for {len(self.lateral_convs)} input levels, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels_list)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"FPN input {i} must be (N, {c}, H, W), got shape {tuple(f.shape)}")
        inner = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.output_convs[i](inner))
        if self.top_block == "maxpool":
            # Kernel 1, stride 2: a plain subsampling of P5 (Detectron's and torchvision's P6).
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results
