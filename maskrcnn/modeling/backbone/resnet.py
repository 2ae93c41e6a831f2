"""ResNet / ResNeXt bottom-up bodies with Detectron.pytorch module names.

Layout (``depth`` 18/34 use basic blocks, 50/101/152 bottleneck blocks)::

    res1  = Sequential(conv1 7x7 s2, bn1, relu, maxpool 3x3 s2 p1)          stride 4,  64 channels
    res2  = Sequential(block 0, block 1, ...)                               stride 4   (256 | basic: 64)
    res3                                                                     stride 8   (512 | 128)
    res4                                                                     stride 16  (1024 | 256)
    res5                                                                     stride 32  (2048 | 512); 16 if dilated

A bottleneck block has ``conv1`` (1x1), ``bn1``, ``conv2`` (3x3, grouped for ResNeXt), ``bn2``, ``conv3`` (1x1),
``bn3`` and, in the first block of a stage, ``downsample = Sequential(conv 1x1 stride s, norm)``. A basic block has
``conv1``/``bn1``/``conv2``/``bn2`` (both 3x3). The norm layers are called ``bn*`` whatever their kind, so that
checkpoints map one-to-one between the FrozenBN, BN and GN variants.

``stride_in_1x1=True`` puts a block's stride in ``conv1`` (Caffe2 / Detectron weights); ``False`` puts it in the
3x3 ``conv2`` (torchvision weights, "ResNet v1.5").
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "FrozenBatchNorm2d", "get_norm", "BottleneckBlock", "BasicBlock", "make_stage", "ResNet",
    "freeze_module", "fuse_frozen_bn", "RESNET_BLOCKS_PER_STAGE",
]

#: Blocks in res2..res5 for each supported depth.
RESNET_BLOCKS_PER_STAGE: Dict[int, Tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_NORMS = ("FrozenBN", "GN", "BN")
_GN_GROUPS = 32


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


def get_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer over ``channels``: ``"FrozenBN"``, ``"GN"`` (32 groups) or ``"BN"`` (trainable)."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        if channels % _GN_GROUPS != 0:
            raise ValueError(f"GN needs channels divisible by {_GN_GROUPS}, got channels={channels}")
        return nn.GroupNorm(_GN_GROUPS, channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm={norm!r} is not supported; use one of {', '.join(repr(n) for n in _NORMS)}")


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    # "same" padding for odd kernels; no bias because a norm layer always follows.
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     bias=False)


def _downsample(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Module:
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride=stride), get_norm(norm, out_ch))


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 residual block.
    ``(N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride))``."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, num_groups: int = 1, stride_in_1x1: bool = True, norm: str = "FrozenBN"):
        super().__init__()
        if bottleneck_channels % num_groups != 0:
            raise ValueError(f"bottleneck_channels={bottleneck_channels} is not divisible by num_groups={num_groups}")
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride=s1)
        self.bn1 = get_norm(norm, bottleneck_channels)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride=s3, dilation=dilation,
                           groups=num_groups)
        self.bn2 = get_norm(norm, bottleneck_channels)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = (_downsample(in_channels, out_channels, stride, norm)
                           if stride != 1 or in_channels != out_channels else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (ResNet-18/34). ``(N, in, H, W) -> (N, out, H/s, W/s)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 norm: str = "FrozenBN"):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride=stride, dilation=dilation)
        self.bn1 = get_norm(norm, out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, dilation=dilation)
        self.bn2 = get_norm(norm, out_channels)
        self.downsample = (_downsample(in_channels, out_channels, stride, norm)
                           if stride != 1 or in_channels != out_channels else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


_BLOCKS = {
    "bottleneck": BottleneckBlock, "bottleneck_transformation": BottleneckBlock,
    "basic": BasicBlock, "basic_transformation": BasicBlock,
}


def _block_class(block: Union[str, Type[nn.Module]]) -> Type[nn.Module]:
    if isinstance(block, str):
        if block not in _BLOCKS:
            raise ValueError(f"block={block!r} is not supported; use one of {', '.join(repr(b) for b in _BLOCKS)}")
        return _BLOCKS[block]
    if block in (BottleneckBlock, BasicBlock):
        return block
    raise ValueError(f"block={block!r} must be 'bottleneck', 'basic', BottleneckBlock or BasicBlock")


def make_stage(block: Union[str, Type[nn.Module]], in_channels: int, bottleneck_channels: int, out_channels: int,
               num_blocks: int, first_stride: int = 1, dilation: int = 1, num_groups: int = 1,
               stride_in_1x1: bool = True, norm: str = "FrozenBN") -> nn.Sequential:
    """One stage (``res2``..``res5``): ``num_blocks`` blocks, the first with stride ``first_stride`` and the
    projection shortcut; every block uses ``dilation``. ``block`` is ``"bottleneck"`` / ``"basic"`` (Detectron's
    ``*_transformation`` names also work) or the block class; basic blocks ignore ``bottleneck_channels`` and
    ``stride_in_1x1`` and need ``num_groups == 1``.
    """
    cls = _block_class(block)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if cls is BasicBlock and num_groups != 1:
        raise ValueError(f"basic blocks do not support grouped convolutions (num_groups={num_groups})")
    blocks: List[nn.Module] = []
    for i in range(num_blocks):
        stride = first_stride if i == 0 else 1
        if cls is BottleneckBlock:
            blocks.append(BottleneckBlock(in_channels, bottleneck_channels, out_channels, stride=stride,
                                          dilation=dilation, num_groups=num_groups, stride_in_1x1=stride_in_1x1,
                                          norm=norm))
        else:
            blocks.append(BasicBlock(in_channels, out_channels, stride=stride, dilation=dilation, norm=norm))
        in_channels = out_channels
    return nn.Sequential(*blocks)


def freeze_module(module: nn.Module) -> nn.Module:
    """Stop ``module`` from learning: every parameter gets ``requires_grad=False`` and every ``nn.BatchNorm2d`` inside
    is replaced (in place) by a :class:`FrozenBatchNorm2d` copy, so that training mode no longer updates its
    statistics either. Returns ``module`` (or the frozen replacement when ``module`` itself is a BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        new = freeze_module(child)
        if new is not child:
            setattr(module, name, new)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ResNet(nn.Module):
    """ResNet / ResNeXt body returning the feature maps of ``return_stages``.

    Args:
        depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck blocks).
        block: ``None`` (from the depth), ``"bottleneck"`` or ``"basic"``.
        num_groups, width_per_group: ResNeXt cardinality and per-group width of res2's 3x3 conv (res2 bottleneck
            width = ``num_groups * width_per_group``, doubled at each later stage); ResNeXt-101 32x8d is (32, 8).
        stride_in_1x1: stride in the first 1x1 conv (Caffe2/Detectron) instead of the 3x3 (torchvision).
        norm: ``"FrozenBN"`` (fixed affine, Detectron's AffineChannel), ``"GN"`` or ``"BN"`` (trainable).
        freeze_at: 0 freezes nothing, 1 the stem ``res1``, k >= 2 ``res1``..``resk`` (Detectron). Frozen BN layers
            become :class:`FrozenBatchNorm2d`.
        res5_dilation: 1, or 2 to keep res5 at stride 16 (dilated 3x3 convs, no stride).
        return_stages: names among ``res2``..``res5``; only the stages up to the last one are built (a C4 body has
            no res5).

    ``forward(x: (N, 3, H, W) float) -> OrderedDict[stage name -> (N, C_stage, ceil(H/stride), ceil(W/stride))]``
    in ``res2``..``res5`` order. ``stage_channels`` and ``stage_strides`` give ``C_stage`` and ``stride`` per built
    stage.
    """

    def __init__(self, depth: int, *, block: Union[str, None] = None, num_groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = True, norm: str = "FrozenBN", freeze_at: int = 2, res5_dilation: int = 1,
                 return_stages: Sequence[str] = ("res4",)):
        super().__init__()
        if depth not in RESNET_BLOCKS_PER_STAGE:
            raise ValueError(f"depth={depth!r} is not supported; use one of {sorted(RESNET_BLOCKS_PER_STAGE)}")
        if block is None:
            block = "basic" if depth < 50 else "bottleneck"
        block_cls = _block_class(block)
        if norm not in _NORMS:
            raise ValueError(f"norm={norm!r} is not supported; use one of {', '.join(repr(n) for n in _NORMS)}")
        if not 0 <= int(freeze_at) <= 5:
            raise ValueError(f"freeze_at={freeze_at!r} must be in 0..5")
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation={res5_dilation!r} must be 1 or 2")
        if num_groups < 1 or width_per_group < 1:
            raise ValueError(f"num_groups={num_groups} and width_per_group={width_per_group} must be >= 1")
        if block_cls is BasicBlock and (num_groups != 1 or width_per_group != 64):
            raise ValueError(f"basic blocks (depth {depth}) need num_groups=1 and width_per_group=64, got "
                             f"num_groups={num_groups}, width_per_group={width_per_group}")
        return_stages = tuple(return_stages)
        bad = [s for s in return_stages if s not in _STAGE_NAMES]
        if not return_stages or bad:
            raise ValueError(f"return_stages={return_stages!r} must be a non-empty subset of {_STAGE_NAMES}")
        self.depth = depth
        self.freeze_at = int(freeze_at)
        self.return_stages = tuple(s for s in _STAGE_NAMES if s in return_stages)
        last = max(_STAGE_NAMES.index(s) for s in return_stages)

        self.res1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
            ("bn1", get_norm(norm, 64)),
            ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        self.stage_channels: Dict[str, int] = {}
        self.stage_strides: Dict[str, int] = {}
        in_ch, stride = 64, 4
        bottleneck = num_groups * width_per_group
        out_ch = 256 if block_cls is BottleneckBlock else 64
        for i, name in enumerate(_STAGE_NAMES[: last + 1]):
            dilation = res5_dilation if name == "res5" else 1
            first_stride = 1 if i == 0 or dilation > 1 else 2
            stage = make_stage(block_cls, in_ch, bottleneck, out_ch, RESNET_BLOCKS_PER_STAGE[depth][i],
                               first_stride=first_stride, dilation=dilation, num_groups=num_groups,
                               stride_in_1x1=stride_in_1x1, norm=norm)
            self.add_module(name, stage)
            stride *= first_stride
            self.stage_channels[name], self.stage_strides[name] = out_ch, stride
            in_ch, bottleneck, out_ch = out_ch, bottleneck * 2, out_ch * 2

        self._init_weights()
        frozen = ("res1",) + _STAGE_NAMES[: self.freeze_at - 1] if self.freeze_at >= 1 else ()
        for name in frozen:
            if name in self._modules:
                freeze_module(self._modules[name])

    def _init_weights(self) -> None:
        # MSRA fill (He et al.) on fan_out, as Detectron's MSRAFill, detectron2 and torchvision do.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects an (N, 3, H, W) input, got shape {tuple(x.shape)}")
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        x = self.res1(x)
        for name in self.stage_channels:
            x = getattr(self, name)(x)
            if name in self.return_stages:
                out[name] = x
        return out


# --- inference-time folding of FrozenBN into convolutions -----------------------------------------------------------
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


def _fuse_children(module: nn.Module) -> None:
    children = dict(module.named_children())
    pairs: List[Tuple[str, str]] = []
    if isinstance(module, nn.Sequential):
        # Consecutive (conv, FrozenBN) elements, e.g. ``downsample = Sequential(conv, bn)`` and the stem.
        names = list(children)
        pairs += [(a, b) for a, b in zip(names, names[1:])]
    # Detectron naming: ``convK`` is always followed by ``bnK`` in forward.
    pairs += [(n, "bn" + n[4:]) for n in children if n.startswith("conv") and "bn" + n[4:] in children]
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
            setattr(module, conv_name, _fold(conv, bn))
            setattr(module, bn_name, nn.Identity())
    for child in module.children():
        _fuse_children(child)


def fuse_frozen_bn(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every ``FrozenBatchNorm2d`` that directly follows a ``Conv2d`` into that conv (weight scaled, bias
    added) and replace it by ``nn.Identity``. Pairs are found by Detectron naming (``convK`` -> ``bnK``) and as
    consecutive elements of an ``nn.Sequential``; anything else is left alone. Outputs are unchanged up to float
    rounding. For inference: the folded bias takes the conv's ``requires_grad``, so do not train the result.
    Returns a fused deep copy, or ``module`` itself edited in place when ``inplace=True``.
    """
    target = module if inplace else copy.deepcopy(module)
    _fuse_children(target)
    return target
