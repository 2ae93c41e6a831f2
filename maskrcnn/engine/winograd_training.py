"""Training with Winograd 3x3 convolutions (``TRAIN.WINOGRAD``; :func:`maskrcnn.engine.speed.prepare_for_training`).

:func:`enable_winograd_training` changes, in place, the class of every plain 3x3 stride-1 zero-padded
``nn.Conv2d`` of a model (in R-50-FPN: the FPN's output convolutions, the RPN's ``RPN_conv``, the mask head's
``mask_fcn*``) to :class:`WinogradConv2d`, and that of every such
:class:`~maskrcnn.engine.frozen_bn_training.FrozenBNConv2d` (``TRAIN.FUSE_FROZEN_BN``: the ResNet blocks' middle
3x3 convolutions, their frozen BN folded in) to :class:`WinogradFrozenBNConv2d`, as ``torch.nn.utils.parametrize``
does: nothing else changes, so parameters keep their identity (optimizers built before are unaffected), state-dict
keys and hooks are unchanged, and ``isinstance`` against the old class still holds. ``enabled=False`` changes them
back; :func:`~maskrcnn.engine.speed.prepare_for_inference` does so first, so that the inference speed features see
plain convolutions.

Both run their forward, input gradient and weight gradient in the Winograd transform domain
(:func:`maskrcnn.ops.conv3x3_winograd_autograd`; the folded one with its ReLU and residual sum,
:class:`_ScaledWinogradConv`) where ``winograd_applies(..., grad=True)`` says it pays: float32 on the CPU, 256+
channels (128+ on large batches of pixels: res3), maps from 14x14 and enough pixels per channel; elsewhere (CUDA,
under autocast, while tracing or compiling, small maps) they are the modules they were. Gradients equal the direct
convolution's up to float rounding (about 1e-5 of their scale).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.winograd import (_transform_filters, conv3x3_winograd, conv3x3_winograd_autograd,
                            conv3x3_winograd_weight_grad, winograd_applies, winograd_tile, winograd_weight)
from .frozen_bn_training import FrozenBNConv2d, _scaled_weight
from .onednn_fusion import _is_winograd_shape

__all__ = ["WinogradConv2d", "WinogradFrozenBNConv2d", "enable_winograd_training"]


def _winograd_wanted(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` (a 3x3 stride-1 convolution) runs ``x`` by Winograd with gradients: float32 weights, no
    autocast, no tracing or compiling, and :func:`~maskrcnn.ops.winograd_applies` (``grad=True``) accepts it."""
    return (conv.weight.dtype == torch.float32
            and not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu"))
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and winograd_applies(x, conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups,
                                 grad=True))


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1, dilation 1, one group, zero padding) whose float32 CPU forward
    and backward run by Winograd where :func:`maskrcnn.ops.winograd_applies` (``grad=True``) accepts the input.
    Made from an ``nn.Conv2d`` in place by :func:`enable_winograd_training`; ``forward(x: (N, C_in, H, W)) -> (N,
    C_out, H, W)`` as the convolution's."""

    def forward(self, x: Tensor) -> Tensor:
        if _winograd_wanted(self, x):
            return conv3x3_winograd_autograd(x, self.weight, self.bias)
        return super().forward(x)


class _ScaledWinogradConv(torch.autograd.Function):
    """``conv2d(x, weight * scale, bias * scale + shift) [+ other]``, then ReLU with ``relu``, by F(tile x tile,
    3x3): the frozen-BN-folded convolution of :class:`~maskrcnn.engine.frozen_bn_training.FrozenBNConv2d` with its
    forward, input gradient and weight gradient in the transform domain. Saves ``x`` and, with ``relu``, the output
    (for the ReLU's mask; the next layer saves it as its input anyway), and recomputes the scaled weight in backward
    as the oneDNN path does in float32. Gradients are the unfused expression's (``grad_weight = grad_scaled_weight
    * scale``) up to float rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
                other: Optional[Tensor], tile: int, relu: bool) -> Tensor:
        b = shift if bias is None else bias * scale + shift
        y = conv3x3_winograd(x, winograd_weight(_scaled_weight(weight, scale, torch.float32), tile, torch.float32),
                             b)
        if other is not None:
            y.add_(other)
        if relu:
            y.relu_()
        ctx.save_for_backward(x, weight, scale, y if relu else None)
        ctx.tile, ctx.relu, ctx.has_bias, ctx.has_other = tile, relu, bias is not None, other is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = torch.ops.aten.threshold_backward(grad, y, 0) if ctx.relu else grad
        gx = gw = gb = None
        if need_x:
            # The input gradient is the 3x3 convolution of g with the flipped, transposed (scaled) filter.
            flipped = _scaled_weight(weight, scale, torch.float32).flip(2, 3).permute(2, 3, 0, 1)
            gx = conv3x3_winograd(g, _transform_filters(flipped, ctx.tile, torch.float32))
        if need_w:
            gw = conv3x3_winograd_weight_grad(x, g, ctx.tile).mul_(scale.view(-1, 1, 1, 1))
        if need_b and ctx.has_bias:
            gb = g.sum((0, 2, 3)).mul_(scale)
        go = g if ctx.has_other and ctx.needs_input_grad[5] else None
        return gx, gw, gb, None, None, go, None, None


class WinogradFrozenBNConv2d(FrozenBNConv2d):
    """A :class:`~maskrcnn.engine.frozen_bn_training.FrozenBNConv2d` (3x3, stride 1, padding 1, one group, zero
    padding; a ResNet block's middle convolution) whose float32 CPU forward and backward, with its fused ReLU and
    residual sum, run by Winograd where :func:`maskrcnn.ops.winograd_applies` (``grad=True``) accepts the input;
    elsewhere the oneDNN path it was. Made in place by :func:`enable_winograd_training`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros" and _winograd_wanted(self, x):
            return self._winograd(x, None, relu=False)
        return super().forward(x)

    def conv_relu(self, x: Tensor, other: Optional[Tensor] = None, tap: bool = False):
        if tap or self.padding_mode != "zeros" or not _winograd_wanted(self, x) or (
                other is not None and (other.shape != (x.shape[0], self.out_channels, *x.shape[2:])
                                       or other.dtype != torch.float32)):
            return super().conv_relu(x, other, tap)
        return self._winograd(x, other, relu=True)

    def _winograd(self, x: Tensor, other: Optional[Tensor], relu: bool) -> Tensor:
        scale, shift = self._frozen_bn.scale_and_shift()
        tile = winograd_tile(x.shape[2], x.shape[3])
        return _ScaledWinogradConv.apply(x, self.weight, self.bias, scale.to(torch.float32),
                                         shift.to(torch.float32), other, tile, relu)


def enable_winograd_training(model: nn.Module, enabled: bool = True) -> int:
    """Make every plain 3x3 stride-1 zero-padded ``nn.Conv2d`` of ``model`` a :class:`WinogradConv2d` and every
    such :class:`~maskrcnn.engine.frozen_bn_training.FrozenBNConv2d` a :class:`WinogradFrozenBNConv2d`, in place
    (``enabled=False``: each back to the class it was). Exact classes only (a subclass may have its own forward).
    Returns the number of convolutions changed."""
    count = 0
    for m in model.modules():
        plain = _PLAIN.get(type(m))
        if enabled and plain is not None and m.padding_mode == "zeros" and _is_winograd_shape(m):
            m.__class__ = plain
            count += 1
        elif not enabled and type(m) in _WINOGRAD:
            m.__class__ = _WINOGRAD[type(m)]
            count += 1
    return count


#: Exact class -> its Winograd class, and back.
_PLAIN = {nn.Conv2d: WinogradConv2d, FrozenBNConv2d: WinogradFrozenBNConv2d}
_WINOGRAD = {v: k for k, v in _PLAIN.items()}
