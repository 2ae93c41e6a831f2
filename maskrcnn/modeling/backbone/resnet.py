"""ResNet / ResNeXt bottom-up bodies with Detectron.pytorch module names.

Layout (``depth`` 18/34 use basic blocks, 50/101/152 bottleneck blocks)::

    res1  = ResNetStem(conv1 7x7 s2, bn1, relu, maxpool 3x3 s2 p1)          stride 4,  64 channels
    res2  = Sequential(block 0, block 1, ...)                               stride 4   (256 | basic: 64)
    res3                                                                     stride 8   (512 | 128)
    res4                                                                     stride 16  (1024 | 256)
    res5                                                                     stride 32  (2048 | 512); 16 if dilated

A bottleneck block has ``conv1`` (1x1), ``bn1``, ``conv2`` (3x3, grouped for ResNeXt), ``bn2``, ``conv3`` (1x1),
``bn3`` and, in the first block of a stage, ``downsample = Sequential(conv 1x1, norm)``. A basic block has
``conv1``/``bn1``/``conv2``/``bn2`` (both 3x3). The norm layers are called ``bn*`` whatever their kind, so that
checkpoints map one-to-one between the FrozenBN, BN and GN variants.

A block's stride ``s`` on a 1x1 convolution (``downsample``, and ``conv1`` with ``stride_in_1x1``) is applied by
subsampling the input (``x[:, :, ::s, ::s]``) before a stride-1 convolution: the same function (a 1x1 kernel with
no padding reads only every ``s``-th pixel), so checkpoints are unchanged, but it avoids oneDNN's strided 1x1
backward kernel, which for channels-last inputs with fewer input channels than its channel block (16 with AVX-512,
8 with AVX2) writes past its workspace: a crash, or wrong weight gradients (oneDNN issue 6035; hit by the
eighth-width ResNet-18 of ``configs/scratch/auto_cpu.yaml``, whose ``res3`` shortcut has 8 input channels).

The blocks and the stem (:class:`ResNetStem`) declare which norm follows which convolution with a
``conv_bn_pairs()`` method (``downsample``, an ``nn.Sequential``, by its order); the folds of
:mod:`maskrcnn.modeling.backbone.frozen_bn` read nothing else.

``stride_in_1x1=True`` puts a block's stride in ``conv1`` (Caffe2 / Detectron weights); ``False`` puts it in the
3x3 ``conv2`` (torchvision weights, "ResNet v1.5").
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

# FrozenBatchNorm2d and fuse_frozen_bn live in frozen_bn.py; imported here too, where they always were.
from .frozen_bn import FrozenBatchNorm2d, fuse_frozen_bn
from .norms import NORMS, get_norm

__all__ = [
    "FrozenBatchNorm2d", "get_norm", "BottleneckBlock", "BasicBlock", "ResNetStem", "make_stage", "ResNet",
    "freeze_module", "fuse_frozen_bn", "RESNET_BLOCKS_PER_STAGE", "subsample",
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
_NORMS = NORMS


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    # "same" padding for odd kernels; no bias because a norm layer always follows.
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     bias=False)


def _downsample(in_ch: int, out_ch: int, norm: str) -> nn.Module:
    # Stride 1: the block subsamples the input first (see the module docstring).
    return nn.Sequential(_conv(in_ch, out_ch, 1), get_norm(norm, out_ch))


def subsample(x: Tensor, stride: int) -> Tensor:
    """``x[:, :, ::stride, ::stride]``: ``(N, C, H, W) -> (N, C, ceil(H/stride), ceil(W/stride))``, the pixels a
    1x1 convolution of that stride reads."""
    return x if stride == 1 else x[:, :, ::stride, ::stride]


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 residual block.
    ``(N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride))``."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, num_groups: int = 1, stride_in_1x1: bool = True, norm: str = "FrozenBN"):
        super().__init__()
        if bottleneck_channels % num_groups != 0:
            raise ValueError(f"bottleneck_channels={bottleneck_channels} is not divisible by num_groups={num_groups}")
        #: subsampling applied to the input of ``conv1`` (with ``stride_in_1x1``) and ``downsample`` (1x1 convs).
        self.input_stride = stride if stride_in_1x1 else 1
        self.shortcut_stride = stride
        s3 = 1 if stride_in_1x1 else stride
        self.conv1 = _conv(in_channels, bottleneck_channels, 1)
        self.bn1 = get_norm(norm, bottleneck_channels)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride=s3, dilation=dilation,
                           groups=num_groups)
        self.bn2 = get_norm(norm, bottleneck_channels)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = (_downsample(in_channels, out_channels, norm)
                           if stride != 1 or in_channels != out_channels else None)
        self.relu = nn.ReLU(inplace=True)

    def conv_bn_pairs(self) -> List[Tuple[str, str]]:
        """``(conv, norm)`` child names, each norm applied to its conv's output (``downsample`` declares its own)."""
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(subsample(x, self.input_stride))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(subsample(x, self.shortcut_stride))
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
        self.shortcut_stride = stride
        self.downsample = (_downsample(in_channels, out_channels, norm)
                           if stride != 1 or in_channels != out_channels else None)
        self.relu = nn.ReLU(inplace=True)

    def conv_bn_pairs(self) -> List[Tuple[str, str]]:
        """``(conv, norm)`` child names, each norm applied to its conv's output (``downsample`` declares its own)."""
        return [("conv1", "bn1"), ("conv2", "bn2")]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(subsample(x, self.shortcut_stride))
        return self.relu(out + identity)


class ResNetStem(nn.Sequential):
    """``res1``: ``conv1`` 7x7 stride 2 (3 -> ``out_channels`` channels, 64 in every ResNet), ``bn1``, ``relu``,
    ``maxpool`` 3x3 stride 2 pad 1; ``(N, 3, H, W) -> (N, out_channels, ceil(H/4), ceil(W/4))``. An
    ``nn.Sequential`` (checkpoint keys ``res1.conv1.weight``, ``res1.bn1.*``) whose class tells the speed transforms
    what it is."""

    def __init__(self, norm: str = "FrozenBN", out_channels: int = 64):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)),
            ("bn1", get_norm(norm, out_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))

    def conv_bn_pairs(self) -> List[Tuple[str, str]]:
        """``(conv, norm)`` child names."""
        return [("conv1", "bn1")]


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
        norm: ``"FrozenBN"`` (fixed affine, Detectron's AffineChannel), ``"GN"``, ``"BN"`` or ``"SyncBN"``
            (trainable; see :mod:`maskrcnn.modeling.backbone.norms`).
        freeze_at: 0 freezes nothing, 1 the stem ``res1``, k >= 2 ``res1``..``resk`` (Detectron). Frozen BN layers
            become :class:`FrozenBatchNorm2d`.
        res5_dilation: 1, or 2 to keep res5 at stride 16 (dilated 3x3 convs, no stride).
        stem_out_channels: channels of the stem ``res1`` (64 in every standard ResNet).
        res2_out_channels: output channels of ``res2``, doubled at each later stage; ``None`` for the depth's
            standard 256 (bottleneck) or 64 (basic). With basic blocks this is the network's width (32 gives a
            half-width ResNet-18 with about a quarter of the multiplications; only for training from scratch, as
            no pretrained weights have that shape).
        return_stages: names among ``res2``..``res5``; only the stages up to the last one are built (a C4 body has
            no res5).

    ``forward(x: (N, 3, H, W) float) -> OrderedDict[stage name -> (N, C_stage, ceil(H/stride), ceil(W/stride))]``
    in ``res2``..``res5`` order. ``stage_channels`` and ``stage_strides`` give ``C_stage`` and ``stride`` per built
    stage.
    """

    def __init__(self, depth: int, *, block: Union[str, None] = None, num_groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = True, norm: str = "FrozenBN", freeze_at: int = 2, res5_dilation: int = 1,
                 return_stages: Sequence[str] = ("res4",), stem_out_channels: int = 64,
                 res2_out_channels: Optional[int] = None):
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
        if int(stem_out_channels) < 1 or (res2_out_channels is not None and int(res2_out_channels) < 1):
            raise ValueError(f"stem_out_channels={stem_out_channels} and res2_out_channels={res2_out_channels} must "
                             f"be >= 1")
        return_stages = tuple(return_stages)
        bad = [s for s in return_stages if s not in _STAGE_NAMES]
        if not return_stages or bad:
            raise ValueError(f"return_stages={return_stages!r} must be a non-empty subset of {_STAGE_NAMES}")
        self.depth = depth
        self.freeze_at = int(freeze_at)
        self.return_stages = tuple(s for s in _STAGE_NAMES if s in return_stages)
        last = max(_STAGE_NAMES.index(s) for s in return_stages)

        self.res1 = ResNetStem(norm, int(stem_out_channels))
        self.stage_channels: Dict[str, int] = {}
        self.stage_strides: Dict[str, int] = {}
        in_ch, stride = int(stem_out_channels), 4
        bottleneck = num_groups * width_per_group
        if res2_out_channels is None:
            res2_out_channels = 256 if block_cls is BottleneckBlock else 64
        out_ch = int(res2_out_channels)
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
        # Channels-last weights (TEST/TRAIN.CHANNELS_LAST) take a channels-last image, so that every activation
        # after it, and oneDNN's fused stem, stays in that layout without a reorder.
        stem_weight = getattr(self.res1.conv1, "weight", None)
        if (isinstance(stem_weight, Tensor) and not stem_weight.is_contiguous()
                and stem_weight.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous(memory_format=torch.channels_last)
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        x = self.res1(x)
        for name in self.stage_channels:
            x = getattr(self, name)(x)
            if name in self.return_stages:
                out[name] = x
        return out
