"""Frozen BatchNorm, and folding it into the convolution before it.

:class:`FrozenBatchNorm2d` is BatchNorm with fixed statistics and affine parameters (Detectron's AffineChannel, with
torchvision's state-dict keys). A frozen norm right after a convolution can be folded into it: the weight scaled
per output channel, the shift added to the bias. Which convolution a norm follows is declared by the modules
themselves (``conv_bn_pairs()`` methods, or the order of an ``nn.Sequential``) and read in one place,
:func:`find_conv_bn_pairs`, used by the inference fold here and by the training fold
(:mod:`maskrcnn.engine.frozen_bn_training`).
"""
from __future__ import annotations

import copy
from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ConvBNPair", "FrozenBatchNorm2d", "find_conv_bn_pairs", "fold_frozen_bn_pairs", "fuse_frozen_bn"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias``, per channel of an ``(N, C, H, W)`` input.
    State-dict keys and maths match ``torchvision.ops.misc.FrozenBatchNorm2d``, so torchvision checkpoints load as
    they are; a ``num_batches_tracked`` entry (from an ``nn.BatchNorm2d``) is ignored when loading.
    The output has the input's dtype (the per-channel scale and shift are cast to it).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        """A frozen copy of ``bn``'s current affine parameters and running statistics."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        frozen = cls(bn.num_features, eps=bn.eps)
        if ref is not None:
            frozen = frozen.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen

    def scale_and_shift(self) -> Tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with ``y = x * scale + shift``; both ``(C,)`` in the buffers' dtype."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # An nn.BatchNorm2d checkpoint carries a counter that has no meaning here; the caller's dict is not touched.
        key = prefix + "num_batches_tracked"
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ConvBNPair(NamedTuple):
    """A convolution and the norm layer applied right after it: children ``conv_name`` and ``norm_name`` of
    ``parent``."""

    parent: nn.Module
    conv_name: str
    norm_name: str

    @property
    def conv(self) -> nn.Module:
        return getattr(self.parent, self.conv_name)

    @property
    def norm(self) -> nn.Module:
        return getattr(self.parent, self.norm_name)


def find_conv_bn_pairs(module: nn.Module) -> List[ConvBNPair]:
    """Every ``(conv, norm)`` pair inside ``module`` (itself included), as the modules declare them.

    A module with a ``conv_bn_pairs()`` method (the ResNet blocks, :class:`ResNetStem`, or any custom module)
    returns the names of its ``(conv, norm)`` children; an ``nn.Sequential`` without that method pairs each
    ``nn.Conv2d`` element with the element after it (its forward applies them in that order). Nothing else is
    guessed. The norm may be of any kind (FrozenBN, BN, GN, or ``nn.Identity`` once folded): callers take the pairs
    they can transform. The list is built before anything is changed, so callers may replace children as they go.
    """
    pairs: List[ConvBNPair] = []
    for parent in module.modules():
        declared = getattr(parent, "conv_bn_pairs", None)
        if callable(declared):
            names = list(declared())
        elif isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            names = [(a, b) for a, b in zip(keys, keys[1:]) if isinstance(parent._modules[a], nn.Conv2d)]
        else:
            continue
        pairs += [ConvBNPair(parent, conv_name, norm_name) for conv_name, norm_name in names]
    return pairs


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    if conv.out_channels != bn.num_features:
        raise ValueError(f"cannot fold {bn} into {conv}: channel counts differ")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        scale, shift = bn.scale_and_shift()
        scale, shift = scale.to(conv.weight.dtype), shift.to(conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        fused.bias.copy_(conv_bias * scale + shift)
    fused.weight.requires_grad_(conv.weight.requires_grad)
    fused.bias.requires_grad_(conv.weight.requires_grad)
    return fused


def fold_frozen_bn_pairs(module: nn.Module, eval_batch_norm: bool = False) -> int:
    """Fold, in place, the norm of every pair of :func:`find_conv_bn_pairs` whose conv is a plain ``nn.Conv2d`` and
    whose norm is a ``FrozenBatchNorm2d`` (or, with ``eval_batch_norm``, an ``nn.BatchNorm2d`` in eval mode with
    running statistics) into the conv (weight scaled, bias added); the norm becomes ``nn.Identity``. Other pairs
    (GN, trainable BN, already folded) are left alone. Returns the number of pairs folded."""
    count = 0
    for pair in find_conv_bn_pairs(module):
        conv, norm = pair.conv, pair.norm
        if (eval_batch_norm and type(norm) is nn.BatchNorm2d and not norm.training
                and norm.track_running_stats):
            norm = FrozenBatchNorm2d.from_batch_norm(norm)
        # A Conv2d subclass (the training fold's FrozenBNConv2d) may already apply the norm: never fold it twice.
        if type(conv) is nn.Conv2d and isinstance(norm, FrozenBatchNorm2d):
            setattr(pair.parent, pair.conv_name, _fold(conv, norm))
            setattr(pair.parent, pair.norm_name, nn.Identity())
            count += 1
    return count


def fuse_frozen_bn(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every ``FrozenBatchNorm2d`` that directly follows a ``Conv2d`` (the pairs of
    :func:`find_conv_bn_pairs`) into that conv and replace it by ``nn.Identity``; anything else is left alone.
    Outputs are unchanged up to float rounding. For inference: the folded bias takes the conv's ``requires_grad``,
    so do not train the result. Returns a fused deep copy, or ``module`` itself edited in place when
    ``inplace=True``.
    """
    target = module if inplace else copy.deepcopy(module)
    fold_frozen_bn_pairs(target)
    return target
