"""Training with Winograd 3x3 convolutions (``TRAIN.WINOGRAD``; :func:`maskrcnn.engine.speed.prepare_for_training`).

:func:`enable_winograd_training` turns every plain 3x3 stride-1 zero-padded ``nn.Conv2d`` of a model (in R-50-FPN:
the FPN's output convolutions, the RPN's ``RPN_conv``, the mask head's ``mask_fcn*``; the backbone's 3x3
convolutions are :class:`~maskrcnn.engine.frozen_bn_training.FrozenBNConv2d` under ``TRAIN.FUSE_FROZEN_BN`` and stay
with oneDNN) into a :class:`WinogradConv2d`, in place: the module's class changes (as ``torch.nn.utils.parametrize``
does), nothing else, so parameters keep their identity (optimizers built before are unaffected), state-dict keys and
hooks are unchanged, and ``isinstance(m, nn.Conv2d)`` still holds. ``enabled=False`` changes them back;
:func:`~maskrcnn.engine.speed.prepare_for_inference` does so first, so that the inference speed features see plain
convolutions.

A :class:`WinogradConv2d` runs its forward, input gradient and weight gradient in the Winograd transform domain
(:func:`maskrcnn.ops.conv3x3_winograd_autograd`) where ``winograd_applies(..., grad=True)`` says it pays: float32 on
the CPU, 256+ channels, maps from 14x14 and enough pixels per channel; elsewhere (CUDA, under autocast, while
tracing or compiling, small maps) it is the ``nn.Conv2d`` it was. Gradients equal the direct convolution's up to
float rounding (about 1e-5 of their scale).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.winograd import conv3x3_winograd_autograd, winograd_applies
from .onednn_fusion import _is_winograd_shape

__all__ = ["WinogradConv2d", "enable_winograd_training"]


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1, dilation 1, one group, zero padding) whose float32 CPU forward
    and backward run by Winograd where :func:`maskrcnn.ops.winograd_applies` (``grad=True``) accepts the input.
    Made from an ``nn.Conv2d`` in place by :func:`enable_winograd_training`; ``forward(x: (N, C_in, H, W)) -> (N,
    C_out, H, W)`` as the convolution's."""

    def _use_winograd(self, x: Tensor) -> bool:
        return (self.weight.dtype == torch.float32
                and not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu"))
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and not torch.compiler.is_compiling()
                and winograd_applies(x, self.weight.shape, self.stride, self.padding, self.dilation, self.groups,
                                     grad=True))

    def forward(self, x: Tensor) -> Tensor:
        if self._use_winograd(x):
            return conv3x3_winograd_autograd(x, self.weight, self.bias)
        return super().forward(x)


def enable_winograd_training(model: nn.Module, enabled: bool = True) -> int:
    """Make every plain 3x3 stride-1 zero-padded ``nn.Conv2d`` of ``model`` a :class:`WinogradConv2d` in place
    (``enabled=False``: every :class:`WinogradConv2d` an ``nn.Conv2d`` again). Returns the number of convolutions
    changed."""
    count = 0
    for m in model.modules():
        if enabled and type(m) is nn.Conv2d and m.padding_mode == "zeros" and _is_winograd_shape(m):
            m.__class__ = WinogradConv2d
            count += 1
        elif not enabled and type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
            count += 1
    return count
