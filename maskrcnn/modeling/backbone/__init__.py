"""``Conv_Body``: ResNet (bottleneck and basic blocks, FrozenBN/BN/SyncBN/GN) with an optional FPN on top."""
from .conv_body import CONV_BODY_REGISTRY, FPNConvBody, ResNetConvBody, build_conv_body, parse_conv_body_name
from .fpn import FPN
from .norms import check_trainable_from_scratch, convert_sync_batchnorm
from .resnet import BasicBlock, BottleneckBlock, FrozenBatchNorm2d, ResNet, fuse_frozen_bn, get_norm, make_stage

__all__ = [
    "build_conv_body",
    "CONV_BODY_REGISTRY",
    "parse_conv_body_name",
    "ResNetConvBody",
    "FPNConvBody",
    "ResNet",
    "FPN",
    "BasicBlock",
    "BottleneckBlock",
    "FrozenBatchNorm2d",
    "fuse_frozen_bn",
    "get_norm",
    "convert_sync_batchnorm",
    "check_trainable_from_scratch",
    "make_stage",
]
