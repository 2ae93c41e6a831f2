"""oneDNN fused convolutions for inference on the CPU (``TEST.FUSE_CONV_ACTIVATIONS``).

ResNet blocks and FPNs whose norms were folded into their convolutions (:func:`maskrcnn.engine.speed.fold_frozen_bn`)
are swapped for modules that call oneDNN's fused primitives: conv + ReLU, and conv + residual add + ReLU in one
pass. Same weights, same results up to float rounding; applied by :func:`maskrcnn.engine.speed.prepare_for_inference`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.backbone.fpn import FPN
from ..modeling.backbone.frozen_bn import find_conv_bn_pairs
from ..modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNetStem
from ..ops.winograd import conv3x3_winograd, winograd_applies, winograd_tile, winograd_weight

__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedConv2d", "FusedFPN", "enable_winograd",
           "fuse_conv_activations", "onednn_fusion_available",
           "onednn_supports_dtype"]


def onednn_fusion_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution ops (``torch.ops.mkldnn._convolution_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_supports_dtype(dtype: torch.dtype) -> bool:
    """Whether this CPU runs oneDNN's convolutions in ``dtype``: bf16 and fp16 need AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT; on a CPU with only AVX2 the fused kernels raise, so :class:`FusedConv2d` takes its plain path."""
    if dtype == torch.float32:
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


class FusedConv2d(nn.Module):
    """Inference-only convolution with a fused epilogue: ``act(conv(x) [+ other])``.

    On the CPU with oneDNN it is one primitive (``mkldnn._convolution_pointwise``: the ReLU and the residual add
    happen while the output tile is in cache); elsewhere, when gradients are needed, or in bf16/fp16 on a CPU
    without oneDNN's kernels for that dtype, it is ``F.conv2d`` followed by the same add and activation.

    Args:
        conv: a ``Conv2d`` with ``padding_mode='zeros'``; its weight and bias are copied into buffers (``weight``,
            ``bias``) under the same names.
        activation: ``"relu"`` or ``"none"``.
        stride: overrides ``conv.stride``: a ResNet block's 1x1 convs have stride 1 and the block subsamples their
            input (:func:`~maskrcnn.modeling.backbone.resnet.subsample`, a workaround for a oneDNN backward bug);
            inference has no backward, so the fused block gives the stride back to the convolution.

    ``forward(x: (N, C_in, H, W), other: optional (N, C_out, H', W') residual) -> (N, C_out, H', W')``. Under CPU
    autocast the convolution runs in the autocast dtype (weights cast once and cached per dtype); the output is in
    the dtype the convolution ran in.

    With ``winograd`` set (:func:`enable_winograd`, ``TEST.WINOGRAD``), a float32 3x3 convolution without a residual
    that :func:`maskrcnn.ops.winograd_applies` accepts runs as :func:`maskrcnn.ops.conv3x3_winograd` (its
    transformed weight computed once and cached), except while tracing, exporting or compiling.
    """

    def __init__(self, conv: nn.Conv2d, activation: str = "none", stride: Optional[int] = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv2d needs an nn.Conv2d with numeric zero padding, got {conv!r}")
        if activation not in ("relu", "none"):
            raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride) if stride is None else (int(stride), int(stride))
        self.padding, self.dilation, self.groups = tuple(conv.padding), tuple(conv.dilation), conv.groups
        self.activation = activation
        self.register_buffer("weight", conv.weight.detach().clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(
            conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        self.register_buffer("bias", bias)
        # dtype -> (weight, bias) cast copies for autocast; dropped whenever the module is moved or cast.
        self._cast_cache: Dict[torch.dtype, Tuple[Tensor, Tensor]] = {}
        self.winograd = False
        # tile side (4, 5 or 6) -> the transformed weight, computed on first use.
        self._winograd_cache: Dict[int, Tensor] = {}

    def _apply(self, fn, recurse=True):
        self._cast_cache, self._winograd_cache = {}, {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cast_cache, self._winograd_cache = {}, {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _use_winograd(self, x: Tensor, dtype: torch.dtype, other: Optional[Tensor]) -> bool:
        return (self.winograd and other is None and dtype == torch.float32
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and not torch.compiler.is_compiling()
                and winograd_applies(x, self.weight.shape, self.stride, self.padding, self.dilation, self.groups))

    def _params_for(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        cached = self._cast_cache.get(dtype)
        if cached is None:
            w = self.weight.to(dtype)
            if self.weight.is_contiguous(memory_format=torch.channels_last):
                w = w.contiguous(memory_format=torch.channels_last)
            cached = (w, self.bias.to(dtype))
            self._cast_cache[dtype] = cached
        return cached

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype

    def forward(self, x: Tensor, other: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
        """``act(conv(x) [+ other])``; with ``accumulate=True`` the result is written into ``other`` (which the
        caller must own and never read again as the addend) instead of a new tensor, when oneDNN runs it."""
        dtype = self._compute_dtype(x)
        if self._use_winograd(x, dtype, other):
            tile = winograd_tile(x.shape[2], x.shape[3])
            weight_t = self._winograd_cache.get(tile)
            if weight_t is None:
                weight_t = self._winograd_cache[tile] = winograd_weight(self.weight, tile)
            return conv3x3_winograd(x, weight_t, self.bias, relu=self.activation == "relu")
        weight, bias = self._params_for(dtype)
        x = x.to(dtype)
        if other is not None:
            other = other.to(dtype)
        # oneDNN's fused kernels take channels-last activations; for contiguous ones PyTorch falls back to a
        # separate add/ReLU that lacks some dtypes, so those run the plain path below.
        onednn = (x.device.type == "cpu" and x.dim() == 4 and onednn_fusion_available()
                  and onednn_supports_dtype(dtype)
                  and x.is_contiguous(memory_format=torch.channels_last)
                  and not (torch.is_grad_enabled() and x.requires_grad))
        if onednn:
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if other is None:
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, self.activation, [], "")
            unary = "relu" if self.activation == "relu" else None
            other = other.contiguous(memory_format=torch.channels_last)
            if accumulate:
                # Writing into the addend saves allocating (and page-faulting) a fresh output.
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    other, x, weight, bias, *args, "add", 1.0, unary, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, weight, bias, *args, "add", 1.0, unary, [], "")
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if other is not None:
            y = y + other
        return F.relu(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"activation={self.activation!r}")


class FusedBottleneck(nn.Module):
    """A folded :class:`BottleneckBlock` as three fused convs: ``relu(conv3(relu(conv2(relu(conv1 x)))) + sc)``
    with the shortcut ``sc`` either ``x`` or the folded projection ``downsample``.

    ``reuse_input``: the block's input is never read after the block (true inside a stage ``nn.Sequential``
    except for its first block), so the output may overwrite it. A projection shortcut is always fresh and is
    overwritten in any case.
    """

    def __init__(self, block: BottleneckBlock, reuse_input: bool = False):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, "relu", stride=block.input_stride)
        self.conv2 = FusedConv2d(block.conv2, "relu")
        self.conv3 = FusedConv2d(block.conv3, "relu")
        self.downsample = (FusedConv2d(block.downsample[0], stride=block.shortcut_stride)
                           if block.downsample is not None else None)
        self.reuse_input = bool(reuse_input)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        reuse = self.downsample is not None or self.reuse_input
        return self.conv3(self.conv2(self.conv1(x)), shortcut, accumulate=reuse)


class FusedBasicBlock(nn.Module):
    """A folded :class:`BasicBlock` as two fused convs: ``relu(conv2(relu(conv1 x)) + sc)`` (``reuse_input`` as
    for :class:`FusedBottleneck`)."""

    def __init__(self, block: BasicBlock, reuse_input: bool = False):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, "relu")
        self.conv2 = FusedConv2d(block.conv2, "relu")
        self.downsample = (FusedConv2d(block.downsample[0], stride=block.shortcut_stride)
                           if block.downsample is not None else None)
        self.reuse_input = bool(reuse_input)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        reuse = self.downsample is not None or self.reuse_input
        return self.conv2(self.conv1(x), shortcut, accumulate=reuse)


class FusedFPN(nn.Module):
    """An :class:`~maskrcnn.modeling.backbone.fpn.FPN` without GroupNorm whose lateral 1x1 convs add the
    upsampled coarser level inside the convolution (into the upsampled tensor, no extra output allocated).
    Same inputs, outputs and arithmetic as the FPN it is built from."""

    def __init__(self, fpn: FPN):
        super().__init__()
        if not all(isinstance(m, nn.Conv2d) for m in list(fpn.lateral_convs) + list(fpn.output_convs)):
            raise ValueError("FusedFPN needs an FPN of plain convolutions (use_gn=False)")
        self.lateral_convs = nn.ModuleList(FusedConv2d(c) for c in fpn.lateral_convs)
        self.output_convs = nn.ModuleList(FusedConv2d(c) for c in fpn.output_convs)
        self.in_channels_list, self.out_channels = list(fpn.in_channels_list), fpn.out_channels
        self.top_block, self.num_outputs = fpn.top_block, fpn.num_outputs

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        features = list(features)
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN was built for {len(self.lateral_convs)} input levels, got {len(features)}")
        inner = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            top_down = F.interpolate(inner, size=features[i].shape[-2:], mode="nearest")
            inner = self.lateral_convs[i](features[i], top_down, accumulate=True)
            results.insert(0, self.output_convs[i](inner))
        if self.top_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


def _is_folded(block: nn.Module) -> bool:
    """A block whose declared norms (:func:`find_conv_bn_pairs`, its ``downsample`` included) are all folded
    (``nn.Identity``), and whose shortcut is the plain ``Sequential(conv, norm)`` the fused blocks expect."""
    if block.downsample is not None and not (isinstance(block.downsample, nn.Sequential)
                                             and len(block.downsample) == 2):
        return False
    return all(isinstance(pair.norm, nn.Identity) for pair in find_conv_bn_pairs(block))


def fuse_conv_activations(model: nn.Module) -> int:
    """Replace, in place, every folded ResNet block by its :class:`FusedBottleneck` / :class:`FusedBasicBlock`,
    every folded stem ``(conv1, Identity, ReLU, ...)`` by a conv+ReLU :class:`FusedConv2d`, and every FPN of
    plain convolutions by a :class:`FusedFPN`.

    Blocks whose norms are not folded (GN, trainable BN, or :func:`fold_frozen_bn` not applied) are left alone.
    Returns the number of modules replaced (0 when oneDNN's fused ops are unavailable). Inference only.
    """
    if not onednn_fusion_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for index, (name, child) in enumerate(list(parent.named_children())):
            # Inside a stage, a block's input is only the previous block's output: it may be overwritten.
            reuse = isinstance(parent, nn.Sequential) and index > 0
            if isinstance(child, BottleneckBlock) and _is_folded(child):
                setattr(parent, name, FusedBottleneck(child, reuse_input=reuse))
                count += 1
            elif isinstance(child, BasicBlock) and _is_folded(child):
                setattr(parent, name, FusedBasicBlock(child, reuse_input=reuse))
                count += 1
            elif type(child) is FPN and all(isinstance(m, nn.Conv2d) for m in child.lateral_convs):
                setattr(parent, name, FusedFPN(child))
                count += 1
        # The ResNet stem (conv1, bn1, relu, maxpool) with bn1 folded.
        if isinstance(parent, ResNetStem):
            conv, bn, relu = parent.conv1, parent.bn1, parent.relu
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.Identity) and isinstance(relu, nn.ReLU):
                parent.conv1 = FusedConv2d(conv, "relu")
                parent.relu = nn.Identity()
                count += 1
    return count


def enable_winograd(model: nn.Module, enabled: bool = True) -> int:
    """Let the 3x3 stride-1 :class:`FusedConv2d` modules of ``model`` run as Winograd F(m x m, 3x3) where it pays
    (``TEST.WINOGRAD``; :mod:`maskrcnn.ops.winograd`), after swapping every plain 3x3 stride-1 zero-padded
    ``nn.Conv2d`` the fusion left (the RPN's ``RPN_conv``, the mask head's ``mask_fcn*``, the keypoint head's
    ``conv_fcn*``) for such a module without an activation: the same convolution, the same state-dict names; the
    layers after it (ReLU, norm) are untouched. Call after :func:`fuse_conv_activations`. ``enabled=False`` turns
    the flag off again. Returns the number of convolutions that may take it. Inference only."""
    if enabled:
        for parent in list(model.modules()):
            for name, conv in list(parent.named_children()):
                if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and _is_winograd_shape(conv):
                    setattr(parent, name, FusedConv2d(conv))
    count = 0
    for m in model.modules():
        if isinstance(m, FusedConv2d) and _is_winograd_shape(m):
            m.winograd = bool(enabled)
            count += 1
    return count


def _is_winograd_shape(conv: nn.Module) -> bool:
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)
