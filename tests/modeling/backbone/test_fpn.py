import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maskrcnn.modeling.backbone.fpn import FPN

IN_CHANNELS = [16, 24, 32, 40]
# Odd sizes, as a ResNet gives for an input whose sides are not multiples of 32 (ceil at each stride).
SIZES = [(25, 31), (13, 16), (7, 8), (4, 4)]


def _features(n=2):
    return [torch.randn(n, c, h, w) for c, (h, w) in zip(IN_CHANNELS, SIZES)]


TV_TO_OURS = {"inner_blocks": "lateral_convs", "layer_blocks": "output_convs"}


def _copy_from_torchvision(ours: FPN, ref: FeaturePyramidNetwork) -> None:
    sd = {}
    for k, v in ref.state_dict().items():
        # inner_blocks.i.0.weight -> lateral_convs.i.weight ; layer_blocks.i.0.bias -> output_convs.i.bias
        block, i, _, param = k.split(".")
        sd[f"{TV_TO_OURS[block]}.{i}.{param}"] = v
    ours.load_state_dict(sd, strict=True)


def test_matches_torchvision_fpn_with_odd_sizes():
    ref = FeaturePyramidNetwork(IN_CHANNELS, 32, extra_blocks=LastLevelMaxPool()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = FPN(IN_CHANNELS, out_channels=32)
    _copy_from_torchvision(ours, ref)
    feats = _features()
    with torch.no_grad():
        expected = list(ref(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        actual = ours(feats)
    assert len(actual) == len(expected) == 5
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert [tuple(a.shape[-2:]) for a in actual] == SIZES + [(2, 2)]
    # P6 is P5 subsampled with stride 2
    torch.testing.assert_close(actual[4], actual[3][:, :, ::2, ::2])


def test_structure_and_init():
    fpn = FPN(IN_CHANNELS, out_channels=64)
    assert fpn.out_channels == 64 and fpn.num_outputs == 5
    assert [c.kernel_size for c in fpn.lateral_convs] == [(1, 1)] * 4
    assert [c.kernel_size for c in fpn.output_convs] == [(3, 3)] * 4
    for conv in list(fpn.lateral_convs) + list(fpn.output_convs):
        assert torch.count_nonzero(conv.bias) == 0
        fan_in = conv.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)  # kaiming_uniform_(a=1) == Caffe2 XavierFill
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.9 * bound
    big = fpn.output_convs[0].weight  # uniform(-b, b) has std b / sqrt(3) = 1 / sqrt(fan_in)
    assert abs(big.std().item() * math.sqrt(big[0].numel()) - 1) < 0.05


def test_zero_init_lateral():
    fpn = FPN(IN_CHANNELS, out_channels=32, zero_init_lateral=True)
    assert all(torch.count_nonzero(c.weight) == 0 for c in fpn.lateral_convs)
    assert all(torch.count_nonzero(c.weight) > 0 for c in fpn.output_convs)
    out = fpn(_features(1))
    out[0].sum().backward()
    assert fpn.lateral_convs[0].weight.grad.abs().sum() > 0


def test_group_norm_variant():
    fpn = FPN(IN_CHANNELS, out_channels=64, use_gn=True)
    for block in list(fpn.lateral_convs) + list(fpn.output_convs):
        assert isinstance(block, nn.Sequential) and block[0].bias is None
        assert isinstance(block[1], nn.GroupNorm) and block[1].num_groups == 32
    out = fpn(_features())
    assert [o.shape[1] for o in out] == [64] * 5
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in fpn.parameters())
    with pytest.raises(ValueError, match="out_channels"):
        FPN(IN_CHANNELS, out_channels=48, use_gn=True)


def test_no_top_block():
    fpn = FPN(IN_CHANNELS, out_channels=32, top_block=None)
    out = fpn(_features(1))
    assert fpn.num_outputs == len(out) == 4
    assert [tuple(o.shape[-2:]) for o in out] == SIZES


def test_bad_inputs():
    fpn = FPN(IN_CHANNELS, out_channels=32)
    with pytest.raises(ValueError, match="4 input levels, got 3"):
        fpn(_features()[:3])
    bad = _features()
    bad[1] = torch.randn(2, 8, 13, 16)
    with pytest.raises(ValueError, match=r"input 1 must be \(N, 24, H, W\)"):
        fpn(bad)
    with pytest.raises(ValueError, match="top_block='conv'"):
        FPN(IN_CHANNELS, top_block="conv")
    with pytest.raises(ValueError, match="in_channels_list"):
        FPN([])
