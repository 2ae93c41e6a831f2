"""Frozen BatchNorm folded into the convolutions during training (``TRAIN.FUSE_FROZEN_BN``).

Each (conv, ``FrozenBatchNorm2d``) pair becomes one convolution whose weight is scaled by the frozen BN at every
call (:class:`FrozenBNConv2d`): one pass over the activation instead of three. Gradients are those of the unfused
pair; parameters, buffers and state-dict keys are unchanged, so optimizers and checkpoints are unaffected. A ResNet
block (or stem) whose convolutions are all folded runs with its ReLUs and residual sum inside them as oneDNN
post-ops (:meth:`FrozenBNConv2d.conv_relu`, channels-last CPU inputs). In bf16 a 1x1 convolution's backward is two
matrix products over the channels-last rows, and in an identity block the residual's gradient is added to the
input's inside the first of them (``conv_relu(..., tap=True)``). In fp32 a stride-2 3x3 convolution's weight
gradient is one matrix product per kernel tap (:func:`_tap_weight_grad`). Applied by
:func:`maskrcnn.engine.speed.prepare_for_training`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.backbone.frozen_bn import FrozenBatchNorm2d, find_conv_bn_pairs
from ..modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNetStem, subsample
from ..ops.winograd import _window
from .onednn_fusion import onednn_fusion_available, onednn_supports_dtype

__all__ = ["FoldedFrozenBatchNorm2d", "FrozenBNConv2d", "fold_frozen_bn_for_training",
           "unfold_frozen_bn_for_training"]


class FrozenBNConv2d(nn.Conv2d):
    """``bn(conv(x))`` for a fixed ``FrozenBatchNorm2d`` ``bn`` as one convolution with weight ``W * s`` and bias
    ``b * s + t`` (``s, t = bn.scale_and_shift()``), computed at every call so that training ``W`` (and loading
    new BN buffers) stays exact. Holds the original conv's ``Parameter`` objects under the same names; the BN module
    stays in the model (as :class:`FoldedFrozenBatchNorm2d`, an identity that keeps the buffers and their keys).
    """

    def __init__(self, conv: nn.Conv2d, bn: "FoldedFrozenBatchNorm2d"):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        # Not a sub-module: the BN stays registered where it was (its buffers keep their state-dict keys).
        self.__dict__["_frozen_bn"] = bn

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._frozen_bn.scale_and_shift()
        w_dtype = self.weight.dtype
        if self.padding_mode != "zeros":
            weight = self.weight * scale.to(w_dtype).view(-1, 1, 1, 1)
            bias = shift.to(w_dtype) if self.bias is None else self.bias * scale.to(w_dtype) + shift.to(w_dtype)
            return self._conv_forward(x, weight, bias)
        # PyTorch sends 1x1 convolutions to its slower reference kernel when it runs single-threaded; oneDNN's
        # (what it picks with more threads) is ~25% faster on channels-last inputs.
        onednn = (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                  and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
                  and x.is_contiguous(memory_format=torch.channels_last))
        return _ScaledWeightConv.apply(x, self.weight, self.bias, scale.to(w_dtype), shift.to(w_dtype),
                                       (self.stride, self.padding, self.dilation, self.groups, onednn))

    def conv_relu(self, x: Tensor, other: Optional[Tensor] = None, tap: bool = False):
        """``relu(self(x))``, or ``relu(self(x) + other)`` (``other`` of the output's shape): one oneDNN primitive
        (the ReLU and the sum as post-ops) on a CPU with oneDNN for channels-last ``x`` in a dtype oneDNN computes,
        else the unfused expression. Gradients are those of the unfused expression (the ReLU's mask from the
        output, as autograd's); in bf16 the sum is rounded once instead of twice.

        ``tap=True`` returns ``(output, x)``, the second output being ``x`` itself for another consumer (a
        residual block's identity): the gradient that consumer sends back reaches this convolution's backward,
        which adds it to the input's gradient inside the matrix product of a 1x1 bf16 convolution
        (:func:`_pointwise_conv_backward`) instead of autograd adding the two afterwards in a pass of its own."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if (self.padding_mode == "zeros" and device_type == "cpu" and x.dim() == 4 and onednn_fusion_available()
                and onednn_supports_dtype(dtype) and x.is_contiguous(memory_format=torch.channels_last)):
            scale, shift = self._frozen_bn.scale_and_shift()
            w_dtype = self.weight.dtype
            out = _ScaledWeightConvReLU.apply(x, self.weight, self.bias, scale.to(w_dtype), shift.to(w_dtype), other,
                                              (self.stride, self.padding, self.dilation, self.groups), tap)
            return out if tap else out[0]
        y = self(x)
        y = F.relu(y + other if other is not None else y, inplace=True)
        return (y, x) if tap else y


class _ScaledWeightConv(torch.autograd.Function):
    """``conv2d(x, weight * scale, bias * scale + shift)`` (``bias`` may be None). In fp32 its backward recomputes
    the scaled weight from ``weight``, a parameter held anyway, instead of saving the scaled copy: saved, the fp32
    copies of res3-res5 would add about 90 MB to every training step. Under bf16 autocast it saves the bf16 copy the
    convolution ran with (half that), which spares backward two passes over the fp32 weights. Gradients are those
    autograd gives for the unfused expression (the same operations: ``grad_weight = grad_scaled_weight * scale``).
    Under autocast the convolution runs in the autocast dtype, as ``F.conv2d`` would (inputs cast, the cast input
    saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
                conf: Tuple[Any, ...]) -> Tensor:
        stride, padding, dilation, groups, onednn = conf
        b = shift if bias is None else bias * scale + shift
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x_in = x.to(dtype)
        with torch.autocast(device_type, enabled=False):
            scaled, b = _scaled_weight(weight, scale, dtype), b.to(dtype)
            if onednn and dtype == torch.float32:
                y = torch.ops.aten.mkldnn_convolution(x_in, scaled, b, list(padding), list(stride), list(dilation),
                                                      groups)
            else:
                y = F.conv2d(x_in, scaled, b, stride, padding, dilation, groups)
        ctx.save_for_backward(x_in, weight, scale, _kept(scaled, weight))
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale, scaled = ctx.saved_tensors
        return (*_scaled_conv_backward(ctx, grad, x, weight, scale, ctx.conf[:4], scaled=scaled), None, None, None)


def _scaled_weight(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(weight * scale[:, None, None, None]).to(dtype)`` in one pass (the product rounded once to ``dtype``), in
    ``weight``'s memory format."""
    out = torch.empty_like(weight, dtype=dtype)
    return torch.mul(weight, scale.view(-1, 1, 1, 1), out=out)


def _kept(scaled: Tensor, weight: Tensor) -> Optional[Tensor]:
    # The scaled weight is saved for backward only when it is a low-precision copy (bf16: about 45 MB for
    # res3-res5, against two passes over the fp32 weights at every backward); an fp32 copy would be twice that,
    # so fp32 recomputes it.
    return scaled if scaled.dtype != weight.dtype else None


def _scaled_conv_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor, conf: Tuple[Any, ...],
                          grad_tap: Optional[Tensor] = None, scaled: Optional[Tensor] = None):
    """``(grad_x, grad_weight, grad_bias)`` of ``conv2d(x, weight * scale, bias * scale + shift)`` for the output
    gradient ``grad`` (None where ``ctx.needs_input_grad`` says no), with the scaled weight forward saved (``scaled``)
    or recomputed (None); ``grad_tap`` (the gradient of another consumer of ``x``, in ``x``'s dtype, or None) is
    added to ``grad_x``."""
    stride, padding, dilation, groups = conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    if not (need_x or need_w or need_b):
        return None, None, None
    if scaled is None:
        scaled = _scaled_weight(weight, scale, x.dtype)
    grad = grad.to(x.dtype)
    if _pointwise_as_matmul(x, grad, scaled, conf):
        add = grad_tap if grad_tap is not None and need_x and grad_tap.dtype == x.dtype and \
            grad_tap.is_contiguous(memory_format=torch.channels_last) else None
        gx, gw, gb = _pointwise_conv_backward(grad, x, scaled, need_x, need_w, need_b, add)
        if add is not None:
            grad_tap = None
    elif need_w and _weight_grad_by_taps(x, grad, scaled, conf):
        gx, _, gb = torch.ops.aten.convolution_backward(
            grad, x, scaled, [scaled.shape[0]], list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_x, False, need_b])
        gw = _tap_weight_grad(grad, x, tuple(scaled.shape[2:]), stride, padding)
    else:
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, scaled, [scaled.shape[0]], list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_x, need_w, need_b])
    if need_x:
        gx = gx.to(ctx.x_dtype)
        if grad_tap is not None:
            gx = gx + grad_tap.to(gx.dtype)
    # The products promote a bf16 gradient to the parameters' fp32 in the same pass.
    return (gx if need_x else None, torch.mul(gw, scale.view(-1, 1, 1, 1)).to(weight.dtype) if need_w else None,
            torch.mul(gb, scale).to(weight.dtype) if need_b else None)


def _weight_grad_by_taps(x: Tensor, grad: Tensor, weight: Tensor, conf: Tuple[Any, ...]) -> bool:
    """Whether :func:`_tap_weight_grad` takes this convolution's weight gradient: a float32 CPU 3x3 convolution of
    stride 2 (the first 3x3 of res3-res5 with the stride in the 3x3, torchvision's layout), no dilation, one
    group, channels-last input and gradient. ``python benchmarks/kernels.py --only taps`` on a 2-core AMD EPYC
    (benchmarks/results/kernels_taps_2026-12-06_epyc_stop37.txt): 0.64, 0.51 and 0.91 of oneDNN's weight-gradient
    time on res3's, res4's and res5's shapes at 800x1066, batch 2."""
    stride, padding, dilation, groups = conf
    return (x.device.type == "cpu" and x.dtype == torch.float32 and grad.dtype == torch.float32 and x.dim() == 4
            and groups == 1 and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (2, 2)
            and all(d == 1 for d in dilation)
            and x.is_contiguous(memory_format=torch.channels_last)
            and grad.is_contiguous(memory_format=torch.channels_last))


def _tap_weight_grad(grad: Tensor, x: Tensor, kernel: Tuple[int, int], stride, padding) -> Tensor:
    """The weight gradient of a dense convolution (no dilation, one group) as one matrix product per kernel tap:
    ``grad_W[:, :, i, j] = grad^T @ X_ij`` over the P = N * H_out * W_out output pixels, ``grad`` (P, C_out) and
    ``X_ij`` (P, C_in) the input pixels tap (i, j) reads, as channels-last rows: the input is copied once into a
    channels-last buffer with the padding's zeros, and each tap's strided pixels into one (P, C_in) buffer.

    Args:
        grad: (N, C_out, H_out, W_out) output gradient; x: (N, C_in, H, W) input; kernel (kh, kw), stride and
            padding (each a pair) of the convolution.
    Returns (C_out, C_in, kh, kw) in ``x``'s dtype.
    """
    n, cin, h, w = x.shape
    cout, ho, wo = grad.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = _window(x.new_empty(n, h + 2 * ph, w + 2 * pw, cin), x.permute(0, 2, 3, 1), 0, -ph, -pw)
    g_rows = grad.permute(0, 2, 3, 1).reshape(-1, cout)
    gw = x.new_empty(kh, kw, cout, cin)
    taps = x.new_empty(n, ho, wo, cin)
    for i in range(kh):
        for j in range(kw):
            taps.copy_(padded[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw])
            torch.mm(g_rows.t(), taps.view(-1, cin), out=gw[i, j])
    return gw.permute(2, 3, 0, 1)


def _pointwise_as_matmul(x: Tensor, grad: Tensor, weight: Tensor, conf: Tuple[Any, ...]) -> bool:
    """Whether :func:`_pointwise_conv_backward` takes this convolution's backward: a 1x1, stride-1, unpadded,
    ungrouped convolution of channels-last bf16 tensors on a CPU with native bf16. ``python benchmarks/kernels.py
    --fp32`` on a 2-core Xeon with AMX (benchmarks/results/kernels_2026-12-06_amx.txt), the 12 trainable 1x1 shapes
    of R-50 at 800x1066, batch 2: in bf16 the two matrix products took 0.68 of oneDNN's convolution backward (90
    against 134 ms; 0.53-0.83 per shape); in fp32 0.90 over the 12 shapes but 0.72-1.14 per shape, so fp32 keeps
    oneDNN's."""
    stride, padding, dilation, groups = conf
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 and groups == 1
            and tuple(weight.shape[2:]) == (1, 1) and all(s == 1 for s in stride) and not any(padding)
            and x.is_contiguous(memory_format=torch.channels_last)
            and grad.is_contiguous(memory_format=torch.channels_last) and onednn_supports_dtype(torch.bfloat16))


def _pointwise_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool,
                             add: Optional[Tensor] = None
                             ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``convolution_backward`` of a 1x1 stride-1 convolution as matrix products over the channels-last rows:
    ``grad`` (N, Cout, H, W) and ``x`` (N, Cin, H, W) are (N*H*W, C) matrices without a copy, so
    ``grad_x = grad @ W`` and ``grad_W = grad^T @ x``; ``weight`` (Cout, Cin, 1, 1). ``grad_x`` is channels-last;
    ``add`` (channels-last, ``x``'s shape and dtype), when given, is added to it by the product itself
    (``addmm``: no pass of its own over the two maps)."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    g_rows = grad.permute(0, 2, 3, 1).reshape(-1, cout)
    gx = gw = gb = None
    if need_x:
        w_rows = weight.reshape(cout, cin)
        gx = (torch.mm(g_rows, w_rows) if add is None else
              torch.addmm(add.permute(0, 2, 3, 1).reshape(-1, cin), g_rows, w_rows))
        gx = gx.view(n, h, w, cin).permute(0, 3, 1, 2)
    if need_w:
        gw = torch.mm(g_rows.t(), x.permute(0, 2, 3, 1).reshape(-1, cin)).view(cout, cin, 1, 1)
    if need_b:
        gb = g_rows.sum(0, dtype=torch.float32).to(grad.dtype)
    return gx, gw, gb


class _ScaledWeightConvReLU(torch.autograd.Function):
    """``relu(conv2d(x, weight * scale, bias * scale + shift) [+ other])`` through oneDNN's fused convolution
    (:meth:`FrozenBNConv2d.conv_relu`); it saves or recomputes the scaled weight as :class:`_ScaledWeightConv` does.
    Saves the output for the ReLU's mask: the next layer saves the same tensor as its input, so it costs nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
                other: Optional[Tensor], conf: Tuple[Any, ...], tap: bool):
        stride, padding, dilation, groups = conf
        b = shift if bias is None else bias * scale + shift
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x_in = x.to(dtype)
        args = (list(padding), list(stride), list(dilation), groups)
        with torch.autocast(device_type, enabled=False):
            scaled, b = _scaled_weight(weight, scale, dtype), b.to(dtype)
            if other is None:
                y = torch.ops.mkldnn._convolution_pointwise(x_in, scaled, b, *args, "relu", [], "")
            else:
                addend = other.to(dtype).contiguous(memory_format=torch.channels_last)
                y = torch.ops.mkldnn._convolution_pointwise.binary(x_in, addend, scaled, b, *args, "add", 1.0,
                                                                   "relu", [], "")
        ctx.save_for_backward(x_in, weight, scale, y, _kept(scaled, weight))
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.other_dtype = None if other is None else other.dtype
        # A tuple either way: autograd.Function outputs are fixed per class. ``x`` returned as itself (autograd
        # makes it a view) so that its consumer's gradient comes back to backward as ``grad_tap``.
        return (y, x) if tap else (y,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, grad_tap: Optional[Tensor] = None):
        x, weight, scale, y, scaled = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad.to(y.dtype), y, 0)
        grad_x, grad_weight, grad_bias = _scaled_conv_backward(ctx, g, x, weight, scale, ctx.conf, grad_tap, scaled)
        grad_other = g.to(ctx.other_dtype) if ctx.needs_input_grad[5] and ctx.other_dtype is not None else None
        return grad_x, grad_weight, grad_bias, None, None, grad_other, None, None


class _FoldedBottleneckBlock(BottleneckBlock):
    """A :class:`BottleneckBlock` whose three FrozenBN-folded convolutions run with their ReLU (and the third with
    the residual sum) fused (:meth:`FrozenBNConv2d.conv_relu`). Set by :func:`fold_frozen_bn_for_training` as the
    block's class: parameters, buffers and state-dict keys are the block's own."""

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is None and self.input_stride == 1:
            # conv1 hands x on as the identity, so that the two gradients of x meet in conv1's backward.
            out, identity = self.conv1.conv_relu(x, tap=True)
        else:
            x1 = _dense(subsample(x, self.input_stride), x)
            identity = x
            if self.downsample is not None:
                # Stride in the 1x1 (Detectron): conv1 and the shortcut read the same pixels, one copy serves both.
                xs = x1 if self.shortcut_stride == self.input_stride else _dense(subsample(x, self.shortcut_stride), x)
                identity = self.downsample(xs)
            out = self.conv1.conv_relu(x1)
        out = self.conv2.conv_relu(out)
        return self.conv3.conv_relu(out, identity)


def _dense(view: Tensor, x: Tensor) -> Tensor:
    # A subsampled channels-last input copied to a dense channels-last tensor (the convolution would copy the
    # strided view anyway): then the 1x1 convolution fuses its ReLU and takes the matrix-product backward.
    if view is x or not x.is_contiguous(memory_format=torch.channels_last):
        return view
    return view.contiguous(memory_format=torch.channels_last)


class _FoldedBasicBlock(BasicBlock):
    """:class:`BasicBlock` with its folded convolutions' ReLU and residual sum fused, as
    :class:`_FoldedBottleneckBlock`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1.conv_relu(x)
        identity = x if self.downsample is None else self.downsample(_dense(subsample(x, self.shortcut_stride), x))
        return self.conv2.conv_relu(out, identity)


class _FoldedStem(ResNetStem):
    """:class:`ResNetStem` with its folded convolution's ReLU fused, as :class:`_FoldedBottleneckBlock`."""

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.conv1.conv_relu(x))


#: Block class -> (its fused training class, its (conv, norm) names).
_FUSED_BLOCKS = {BottleneckBlock: (_FoldedBottleneckBlock, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")),
                 BasicBlock: (_FoldedBasicBlock, ("conv1", "bn1", "conv2", "bn2")),
                 ResNetStem: (_FoldedStem, ("conv1", "bn1"))}


def _fuse_blocks(model: nn.Module) -> None:
    # Exact classes only: a subclass may have its own forward.
    for block in model.modules():
        fused = _FUSED_BLOCKS.get(type(block))
        if fused is None or type(getattr(block, "relu", None)) is not nn.ReLU:
            continue
        cls, names = fused
        if all(type(getattr(block, c)) is FrozenBNConv2d and type(getattr(block, n)) is FoldedFrozenBatchNorm2d
               for c, n in zip(names[::2], names[1::2])):
            block.__class__ = cls


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` whose transform was folded into the preceding :class:`FrozenBNConv2d`: identity in
    forward, same buffers (and state-dict keys) as the original."""

    @classmethod
    def from_frozen(cls, bn: FrozenBatchNorm2d) -> "FoldedFrozenBatchNorm2d":
        folded = cls(bn.num_features, eps=bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(folded, name, getattr(bn, name))
        return folded

    def forward(self, x: Tensor) -> Tensor:
        return x


def fold_frozen_bn_for_training(model: nn.Module) -> int:
    """Replace, in place, each (``Conv2d``, ``FrozenBatchNorm2d``) pair that the modules declare
    (:func:`~maskrcnn.modeling.backbone.frozen_bn.find_conv_bn_pairs`) by a :class:`FrozenBNConv2d` and a
    :class:`FoldedFrozenBatchNorm2d`. Trainable parameters (objects and names), buffers and state-dict keys are
    unchanged. Returns the number of pairs folded (0 for pairs folded before)."""
    count = 0
    for pair in find_conv_bn_pairs(model):
        conv, bn = pair.conv, pair.norm
        if (type(conv) is nn.Conv2d and isinstance(bn, FrozenBatchNorm2d)
                and not isinstance(bn, FoldedFrozenBatchNorm2d) and conv.out_channels == bn.num_features):
            folded_bn = FoldedFrozenBatchNorm2d.from_frozen(bn)
            setattr(pair.parent, pair.norm_name, folded_bn)
            setattr(pair.parent, pair.conv_name, FrozenBNConv2d(conv, folded_bn))
            count += 1
    _fuse_blocks(model)
    return count


def unfold_frozen_bn_for_training(model: nn.Module) -> int:
    """Undo :func:`fold_frozen_bn_for_training` in place: each :class:`FrozenBNConv2d` becomes a plain ``Conv2d``
    (same ``Parameter`` objects) and each :class:`FoldedFrozenBatchNorm2d` a ``FrozenBatchNorm2d`` (same buffers).
    Returns the number of pairs restored."""
    count = 0
    for module in model.modules():
        if type(module) in (_FoldedBottleneckBlock, _FoldedBasicBlock, _FoldedStem):
            module.__class__ = module.__class__.__mro__[1]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBNConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, groups=child.groups,
                                 bias=child.bias is not None, padding_mode=child.padding_mode, device="meta")
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
                count += 1
            elif isinstance(child, FoldedFrozenBatchNorm2d):
                bn = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    setattr(bn, buf, getattr(child, buf))
                setattr(parent, name, bn)
    return count
