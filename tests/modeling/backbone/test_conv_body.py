import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.backbone.conv_body import (
    CONV_BODY_REGISTRY,
    FPNConvBody,
    ResNetConvBody,
    build_conv_body,
    parse_conv_body_name,
)
from maskrcnn.modeling.backbone.resnet import BasicBlock, BottleneckBlock, FrozenBatchNorm2d

FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]


def make_cfg(body, *opts):
    cfg = get_cfg()
    cfg.MODEL.CONV_BODY = body
    if "conv4" not in body:  # the default heads are C4 ones
        cfg.FAST_RCNN.ROI_BOX_HEAD = "fast_rcnn_heads.roi_2mlp_head"
        cfg.MRCNN.ROI_MASK_HEAD = "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"
    cfg.merge_from_list(list(opts))
    assert_and_infer_cfg(cfg, make_immutable=False)
    return cfg


def build_meta(cfg):
    # Structure-only checks: the meta device skips weight init and memory.
    with torch.device("meta"):
        return build_conv_body(cfg)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
        elif isinstance(m, (FrozenBatchNorm2d, TVFrozenBatchNorm2d)):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return module


def tv_fpn_backbone_to_ours(state_dict):
    """torchvision BackboneWithFPN keys -> FPNConvBody keys.

    body.conv1 / body.bn1             -> conv_body.res1.conv1 / conv_body.res1.bn1
    body.layer{k}.{i}.<rest>          -> conv_body.res{k+1}.{i}.<rest>   (conv1..3, bn1..3, downsample.0/1)
    fpn.inner_blocks.{i}.0.<param>    -> fpn.lateral_convs.{i}.<param>
    fpn.layer_blocks.{i}.0.<param>    -> fpn.output_convs.{i}.<param>
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("body.conv1.", "body.bn1.")):
            out["conv_body.res1." + k[len("body."):]] = v
        elif k.startswith("body.layer"):
            out[f"conv_body.res{int(k[10]) + 1}" + k[11:]] = v
        elif k.startswith("fpn.inner_blocks."):
            _, _, i, _, param = k.split(".")
            out[f"fpn.lateral_convs.{i}.{param}"] = v
        elif k.startswith("fpn.layer_blocks."):
            _, _, i, _, param = k.split(".")
            out[f"fpn.output_convs.{i}.{param}"] = v
        else:
            raise AssertionError(f"unmapped torchvision key {k}")
    return out


def test_fpn_body_matches_torchvision_resnet_fpn_backbone():
    ref = randomize(resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3), seed=7).eval()
    with torch.device("meta"):  # every weight comes from the reference
        ours = FPNConvBody(50, stride_in_1x1=False, norm="FrozenBN", freeze_at=2, max_level=6)
    ours.load_state_dict(tv_fpn_backbone_to_ours(ref.state_dict()), strict=True, assign=True)
    ours.eval()
    assert ours.out_channels == ref.out_channels == 256
    for size in ((128, 160), (97, 131)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = list(ref(x).values())  # '0', '1', '2', '3', 'pool' = P2..P6
            actual = ours(x)
        assert len(actual) == len(expected) == 5
        for level, (a, e) in enumerate(zip(actual, expected), start=2):
            assert a.shape == e.shape, f"P{level}"
            scale = e.abs().max().item()
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale, msg=f"P{level}")
            assert a.shape[-1] == math.ceil(size[1] * ours.spatial_scales[level - 2])


@pytest.mark.parametrize("name,cls,channels,scales,block", [
    ("ResNet.ResNet50_conv4_body", ResNetConvBody, 1024, [1 / 16], BottleneckBlock),
    ("ResNet50_conv5_body", ResNetConvBody, 2048, [1 / 32], BottleneckBlock),
    ("ResNet.ResNet18_conv4_body", ResNetConvBody, 256, [1 / 16], BasicBlock),
    ("ResNet34_conv5_body", ResNetConvBody, 512, [1 / 32], BasicBlock),
    ("ResNet.ResNet152_conv4_body", ResNetConvBody, 1024, [1 / 16], BottleneckBlock),
    ("FPN.fpn_ResNet50_conv5_body", FPNConvBody, 256, FPN_SCALES, BottleneckBlock),
    ("fpn_ResNet18_conv5_body", FPNConvBody, 256, FPN_SCALES, BasicBlock),
    ("FPN.fpn_ResNet101_conv5_body", FPNConvBody, 256, FPN_SCALES, BottleneckBlock),
])
def test_from_cfg_names(name, cls, channels, scales, block):
    body = build_meta(make_cfg(name))
    assert type(body) is cls
    assert body.out_channels == channels and body.spatial_scales == scales
    resnet = body.conv_body if cls is FPNConvBody else body
    assert isinstance(resnet.res2[0], block)
    depth = parse_conv_body_name(name)[1]
    assert resnet.depth == depth
    assert hasattr(resnet, "res5") == (cls is FPNConvBody or "conv5" in name)
    # Detectron defaults: stride in the 1x1 conv, FrozenBN, stem and res2 frozen
    if block is BottleneckBlock:
        assert resnet.res3[0].input_stride == 2 and resnet.res3[0].conv2.stride == (1, 1)
    assert isinstance(resnet.res3[0].bn1, FrozenBatchNorm2d)
    assert not resnet.res2[0].conv1.weight.requires_grad and resnet.res3[0].conv1.weight.requires_grad


def test_c4_body_forward_is_a_tensor():
    body = build_conv_body(make_cfg("ResNet.ResNet18_conv4_body")).eval()
    with torch.no_grad():
        out = body(torch.rand(2, 3, 64, 96))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 256, 4, 6)


def test_fpn_body_forward_levels():
    body = build_conv_body(make_cfg("fpn_ResNet18_conv5_body", "FPN.DIM", 64)).eval()
    with torch.no_grad():
        out = body(torch.rand(1, 3, 64, 96))
    assert isinstance(out, list) and len(out) == 5
    assert [tuple(o.shape) for o in out] == [(1, 64, 64 * s, 96 * s) for s in (1 / 4, 1 / 8, 1 / 16, 1 / 32)] + \
        [(1, 64, 1, 2)]


def test_conv5_dilated_body():
    cfg = make_cfg("ResNet.ResNet50_conv5_body", "RESNETS.RES5_DILATION", 2)
    body = build_conv_body(cfg).eval()
    assert body.spatial_scales == [1 / 16] and body.out_channels == 2048
    with torch.no_grad():
        assert body(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


def test_cfg_keys_reach_the_modules():
    cfg = make_cfg("FPN.fpn_ResNet101_conv5_body", "RESNETS.NUM_GROUPS", 32, "RESNETS.WIDTH_PER_GROUP", 8,
                   "RESNETS.STRIDE_1X1", False, "RESNETS.FREEZE_AT", 0, "RESNETS.NORM", "GN", "FPN.DIM", 128,
                   "FPN.USE_GN", True, "FPN.ZERO_INIT_LATERAL", True)
    body = build_meta(cfg)
    r = body.conv_body
    assert r.res2[0].conv2.groups == 32 and r.res2[0].conv2.out_channels == 256
    assert r.res3[0].conv1.stride == (1, 1) and r.res3[0].conv2.stride == (2, 2)
    assert isinstance(r.res1.bn1, nn.GroupNorm) and r.res1.conv1.weight.requires_grad
    assert body.out_channels == 128 and isinstance(body.fpn.lateral_convs[0][1], nn.GroupNorm)
    narrow = build_meta(make_cfg("FPN.fpn_ResNet18_conv5_body", "RESNETS.STEM_OUT_CHANNELS", 16,
                                 "RESNETS.RES2_OUT_CHANNELS", 32, "RESNETS.FREEZE_AT", 0, "RESNETS.NORM", "BN"))
    assert narrow.conv_body.res1.conv1.out_channels == 16
    assert [c[0].in_channels if isinstance(c, nn.Sequential) else c.in_channels for c in narrow.fpn.lateral_convs] \
        == [32, 64, 128, 256]
    c4 = build_meta(make_cfg("ResNet.ResNet50_conv4_body", "RESNETS.RES2_OUT_CHANNELS", 128))
    assert c4.out_channels == 512 and c4.res4[-1].conv3.out_channels == 512
    zero = build_conv_body(make_cfg("fpn_ResNet18_conv5_body", "FPN.ZERO_INIT_LATERAL", True))
    assert all(torch.count_nonzero(c.weight) == 0 for c in zero.fpn.lateral_convs)


@pytest.mark.parametrize("rpn_max,roi_max,levels", [(6, 5, 5), (5, 5, 4), (5, 4, 4), (4, 4, 4)])
def test_fpn_levels_follow_rpn_and_roi_max_level(rpn_max, roi_max, levels):
    cfg = make_cfg("FPN.fpn_ResNet50_conv5_body", "FPN.RPN_MAX_LEVEL", rpn_max, "FPN.ROI_MAX_LEVEL", roi_max,
                   "FPN.ROI_MIN_LEVEL", 2)
    body = build_meta(cfg)
    assert body.spatial_scales == FPN_SCALES[:levels] and body.fpn.num_outputs == levels


def test_bad_body_name_names_the_key_and_value():
    cfg = get_cfg()
    cfg.MODEL.CONV_BODY = "ResNet.ResNet51_conv4_body"
    with pytest.raises(ConfigError, match=r"MODEL\.CONV_BODY = 'ResNet\.ResNet51_conv4_body'"):
        build_conv_body(cfg)
    cfg.MODEL.CONV_BODY = "FPN.fpn_ResNet50_conv5_body"
    with pytest.raises(ConfigError, match="MODEL.CONV_BODY"):
        ResNetConvBody.from_cfg(cfg)
    cfg.MODEL.CONV_BODY = "ResNet50_conv4_body"
    with pytest.raises(ConfigError, match="MODEL.CONV_BODY"):
        FPNConvBody.from_cfg(cfg)


def test_basic_transformation_with_bottleneck_depth_is_rejected():
    cfg = make_cfg("ResNet.ResNet50_conv4_body")
    cfg.RESNETS.TRANS_FUNC = "basic_transformation"
    with pytest.raises(ConfigError, match="RESNETS.TRANS_FUNC"):
        build_meta(cfg)


def test_freeze_conv_body():
    body = build_meta(make_cfg("FPN.fpn_ResNet50_conv5_body", "TRAIN.FREEZE_CONV_BODY", True, "RESNETS.NORM", "BN"))
    assert not any(p.requires_grad for p in body.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())


class _TinyBody(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=16, padding=1)
        self.out_channels, self.spatial_scales = channels, [1 / 16]

    def forward(self, x):
        return self.conv(x)


def test_registry_builds_a_custom_body():
    cfg = get_cfg()
    cfg.MODEL.CONV_BODY = "Tiny.tiny_body"
    CONV_BODY_REGISTRY["Tiny.tiny_body"] = lambda c: _TinyBody(c.FPN.DIM)
    CONV_BODY_REGISTRY["broken"] = lambda c: "not a module"
    try:
        body = build_conv_body(cfg)
        assert isinstance(body, _TinyBody) and body.out_channels == 256
        cfg.MODEL.CONV_BODY = "tiny_body"  # the prefix is optional
        assert isinstance(build_conv_body(cfg), _TinyBody)
        cfg.MODEL.CONV_BODY = "broken"
        with pytest.raises(ConfigError, match="out_channels"):
            build_conv_body(cfg)
    finally:
        del CONV_BODY_REGISTRY["Tiny.tiny_body"], CONV_BODY_REGISTRY["broken"]
    cfg.MODEL.CONV_BODY = "Tiny.tiny_body"
    with pytest.raises(ConfigError, match="not a registered conv body"):
        build_conv_body(cfg)
