import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from maskrcnn.modeling.backbone.resnet import (
    BasicBlock,
    BottleneckBlock,
    FrozenBatchNorm2d,
    ResNet,
    freeze_module,
    fuse_frozen_bn,
    get_norm,
    make_stage,
)

STAGES = ("res2", "res3", "res4", "res5")


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and norm statistics, so that equalities cannot hold by the accident of a default init."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(1.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
        elif isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, TVFrozenBatchNorm2d)):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return module


def tv_to_ours(state_dict):
    """torchvision ResNet keys -> ours: conv1/bn1 -> res1.conv1/bn1, layer{k} -> res{k+1}; fc dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("conv1.", "bn1.")):
            out["res1." + k] = v
        elif k.startswith("layer"):
            out[f"res{int(k[5]) + 1}" + k[6:]] = v
        else:
            assert k.startswith("fc."), k
    return out


def tv_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def assert_rel_close(actual, expected, rel=1e-4):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# --- FrozenBatchNorm2d / get_norm ------------------------------------------------------------------------------------
def test_frozen_bn_matches_torchvision_and_loads_batchnorm():
    ours = randomize(FrozenBatchNorm2d(8))
    ref = TVFrozenBatchNorm2d(8)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(ours.parameters()) == []
    x = torch.randn(2, 8, 5, 7)
    assert_rel_close(ours(x), ref(x), rel=1e-6)

    bn = randomize(nn.BatchNorm2d(8)).eval()
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(sd, strict=True)
    assert "num_batches_tracked" in sd  # the caller's dict is not modified
    assert_rel_close(frozen(x), bn(x), rel=1e-5)
    assert_rel_close(FrozenBatchNorm2d.from_batch_norm(bn)(x), bn(x), rel=1e-5)
    with pytest.raises(RuntimeError, match="Unexpected"):
        frozen.load_state_dict({**sd, "extra": torch.zeros(1)}, strict=True)
    assert frozen(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_get_norm():
    assert isinstance(get_norm("FrozenBN", 64), FrozenBatchNorm2d)
    bn = get_norm("BN", 64)
    assert isinstance(bn, nn.BatchNorm2d) and bn.weight.requires_grad
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    with pytest.raises(ValueError, match="'LN'"):
        get_norm("LN", 64)
    with pytest.raises(ValueError, match="channels=48"):
        get_norm("GN", 48)


# --- structure and shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)), (34, (64, 128, 256, 512)),
                                            (50, (256, 512, 1024, 2048))])
def test_shapes_strides_channels(depth, channels):
    model = ResNet(depth, return_stages=STAGES).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert list(out) == list(STAGES)
    for (name, t), c, s in zip(out.items(), channels, (4, 8, 16, 32)):
        assert t.shape == (1, c, 64 // s, 96 // s), name
        assert model.stage_channels[name] == c and model.stage_strides[name] == s
    block = BasicBlock if depth < 50 else BottleneckBlock
    assert all(isinstance(b, block) for n in STAGES for b in getattr(model, n))
    names = dict(model.named_modules())
    assert {"res1.conv1", "res1.bn1", "res2.0.conv1", "res2.0.bn2", "res3.0.downsample.0", "res3.0.downsample.1"} \
        <= set(names)
    assert ("res2.0.conv3" in names) == (depth >= 50)
    assert names["res1.conv1"].kernel_size == (7, 7) and names["res1.conv1"].bias is None


@pytest.mark.parametrize("depth,stem,res2,channels", [(18, 32, 32, (32, 64, 128, 256)), (18, 16, 24, (24, 48, 96, 192)),
                                                      (50, 32, 128, (128, 256, 512, 1024))])
def test_stem_and_res2_widths(depth, stem, res2, channels):
    model = ResNet(depth, return_stages=STAGES, stem_out_channels=stem, res2_out_channels=res2, norm="BN",
                   freeze_at=0).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96))
    assert [t.shape[1] for t in out.values()] == list(channels)
    assert [model.stage_channels[n] for n in STAGES] == list(channels)
    assert model.res1.conv1.out_channels == stem and model.res1.bn1.num_features == stem
    # res2's first block projects the stem's channels when they differ from res2's (a basic block otherwise adds
    # the identity).
    assert (model.res2[0].downsample is not None) == (stem != res2)
    # Half width: about a quarter of the parameters of the standard network.
    if depth == 18 and stem == 32:
        full = sum(p.numel() for p in ResNet(18, return_stages=STAGES).parameters())
        half = sum(p.numel() for p in model.parameters())
        assert 0.2 < half / full < 0.3


def test_odd_input_size_rounds_up():
    model = ResNet(18, return_stages=STAGES).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 61, 83))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(16, 21), (8, 11), (4, 6), (2, 3)]


@pytest.mark.parametrize("tv_name,depth", [("resnet101", 101), ("resnet152", 152)])
def test_deep_variants_match_torchvision_param_count(tv_name, depth):
    # Built on the meta device: structure only, no memory and no init time.
    with torch.device("meta"):
        ours = ResNet(depth, norm="BN", freeze_at=0, return_stages=STAGES)
        ref = getattr(torchvision.models, tv_name)(weights=None)
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert [len(getattr(ours, s)) for s in STAGES] == [len(getattr(ref, f"layer{i}")) for i in range(1, 5)]
    assert set(ours.state_dict()) == set(tv_to_ours(ref.state_dict()))


@pytest.mark.parametrize("tv_name,groups,width", [("resnext101_32x8d", 32, 8), ("resnext101_64x4d", 64, 4)])
def test_resnext_param_count_and_keys(tv_name, groups, width):
    with torch.device("meta"):
        ours = ResNet(101, num_groups=groups, width_per_group=width, stride_in_1x1=False, norm="BN",
                      freeze_at=0, return_stages=STAGES)
        ref = getattr(torchvision.models, tv_name)(weights=None)
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    ours_sd, ref_sd = ours.state_dict(), tv_to_ours(ref.state_dict())
    assert set(ours_sd) == set(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ours_sd)
    assert ours.res2[0].conv2.groups == groups and ours.res2[0].conv2.out_channels == groups * width


def test_c4_body_builds_no_res5():
    model = ResNet(50, return_stages=("res4",))
    assert not hasattr(model, "res5") and list(model.stage_channels) == ["res2", "res3", "res4"]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert list(out) == ["res4"] and out["res4"].shape == (1, 1024, 2, 2)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_stride_placement(stride_in_1x1):
    block = randomize(ResNet(50, stride_in_1x1=stride_in_1x1, norm="BN").res3[0]).eval()
    # The 1x1 convs run at stride 1 on a subsampled input (oneDNN workaround, see resnet.py's docstring).
    assert block.conv1.stride == (1, 1) and block.input_stride == (2 if stride_in_1x1 else 1)
    assert block.conv2.stride == ((1, 1) if stride_in_1x1 else (2, 2))
    assert block.downsample[0].stride == (1, 1) and block.shortcut_stride == 2
    # ... and compute exactly what the strided convolutions compute: Detectron's / torchvision's block.
    x = torch.randn(2, 256, 15, 14)
    s1 = 2 if stride_in_1x1 else 1
    ref = block.relu(block.bn1(F.conv2d(x, block.conv1.weight, stride=s1)))
    ref = block.relu(block.bn2(block.conv2(ref)))
    ref = block.bn3(block.conv3(ref))
    ref = block.relu(ref + block.downsample[1](F.conv2d(x, block.downsample[0].weight, stride=2)))
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 512, 8, 7)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_basic_block_shortcut_is_strided_conv():
    block = randomize(BasicBlock(8, 16, stride=2, norm="BN")).eval()
    x = torch.randn(1, 8, 9, 10)
    ref = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
                     + block.downsample[1](F.conv2d(x, block.downsample[0].weight, stride=2)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref.detach(), rtol=1e-5, atol=1e-5)


_CHANNELS_LAST_GRADS = """
import torch
from maskrcnn.modeling.backbone.resnet import BasicBlock, BottleneckBlock
torch.manual_seed(0)
for block in (BasicBlock(8, 16, stride=2, norm="BN"), BottleneckBlock(4, 8, 16, stride=2, norm="BN")):
    x = torch.randn(4, block.conv1.in_channels, 72, 72)
    grads = []
    for fmt, dtype in ((torch.channels_last, torch.float32), (torch.contiguous_format, torch.float64)):
        b = block.to(dtype=dtype, memory_format=fmt).train()
        b.zero_grad()
        xi = x.to(dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        out = b(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([xi.grad.float().clone()] + [p.grad.float().clone() for p in b.parameters()])
    for a, r in zip(*grads):  # float32 vs float64 sums of up to 20736 terms: relative to the largest gradient
        assert (a - r).abs().max() <= 1e-4 * r.abs().max(), (a - r).abs().max() / r.abs().max()
print("ok")
"""


def test_channels_last_training_with_few_channels():
    """oneDNN's strided 1x1 backward writes past its workspace for channels-last inputs with fewer than 16 (AVX-512)
    / 8 (AVX2) input channels (oneDNN issue 6035: a segfault, a hang or wrong weight gradients). The blocks must not
    reach that kernel: a channels-last training step of narrow blocks gives the float64 NCHW gradients. In a child
    process, because the failure is a crash."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CHANNELS_LAST_GRADS], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_res5_dilation():
    model = ResNet(50, res5_dilation=2, return_stages=("res4", "res5")).eval()
    assert model.stage_strides["res5"] == 16
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in model.res5)
    assert model.res5[0].conv1.stride == (1, 1) and model.res5[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out["res5"].shape == (1, 2048, 4, 4) and out["res4"].shape == (1, 1024, 4, 4)


def test_make_stage():
    stage = make_stage("bottleneck", 1024, 512, 2048, 3, first_stride=2, stride_in_1x1=True)
    assert len(stage) == 3 and stage[0].downsample is not None and stage[1].downsample is None
    assert stage[0].input_stride == 2 and stage[0].conv1.stride == (1, 1)
    with torch.no_grad():
        assert stage(torch.rand(2, 1024, 14, 14)).shape == (2, 2048, 7, 7)
    basic = make_stage("basic_transformation", 64, 0, 128, 2, first_stride=2, norm="BN")
    assert isinstance(basic[0], BasicBlock) and isinstance(basic[0].bn1, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="num_groups"):
        make_stage("basic", 64, 64, 64, 2, num_groups=32)
    with pytest.raises(ValueError, match="'resblock'"):
        make_stage("resblock", 64, 64, 64, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth=42"):
        ResNet(42)
    with pytest.raises(ValueError, match="norm='LayerNorm'"):  # SyncBN is supported (tests/modeling/backbone/test_norms.py)
        ResNet(18, norm="LayerNorm")
    with pytest.raises(ValueError, match="return_stages"):
        ResNet(18, return_stages=("res6",))
    with pytest.raises(ValueError, match="freeze_at=6"):
        ResNet(18, freeze_at=6)
    with pytest.raises(ValueError, match="num_groups=32"):
        ResNet(18, num_groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="res2_out_channels=0"):
        ResNet(18, res2_out_channels=0)
    with pytest.raises(ValueError, match="shape"):
        ResNet(18)(torch.rand(1, 1, 32, 32))


def test_msra_init():
    model = ResNet(50, return_stages=("res3",))
    w = model.res3[0].conv2.weight  # 128 x 128 x 3 x 3
    expected = math.sqrt(2.0 / (w.shape[0] * 9))
    assert abs(w.std().item() / expected - 1) < 0.05
    assert abs(w.mean().item()) < 0.05 * expected


# --- equivalence with torchvision's classification ResNets ------------------------------------------------------------
@pytest.mark.parametrize("tv_name,depth,groups,width", [
    ("resnet18", 18, 1, 64), ("resnet34", 34, 1, 64), ("resnext50_32x4d", 50, 32, 4)])
def test_matches_torchvision_resnet(tv_name, depth, groups, width):
    ref = randomize(getattr(torchvision.models, tv_name)(weights=None), seed=depth).eval()
    sd = tv_to_ours(ref.state_dict())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = tv_features(ref, x)
    # Trainable BN in eval mode, and FrozenBN with frozen stem+res2 (BN checkpoints load into FrozenBN as they are).
    for norm, freeze_at in (("BN", 0), ("FrozenBN", 2)):
        with torch.device("meta"):  # the weights all come from the checkpoint: skip the init
            ours = ResNet(depth, num_groups=groups, width_per_group=width, stride_in_1x1=False, norm=norm,
                          freeze_at=freeze_at, return_stages=STAGES)
        ours.load_state_dict(sd, strict=True, assign=True)
        ours.eval()
        with torch.no_grad():
            actual = list(ours(x).values())
        for a, e in zip(actual, expected):
            assert a.shape == e.shape
            assert_rel_close(a, e)


# --- freezing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4])
def test_freeze_at_gradients(freeze_at):
    model = ResNet(18, freeze_at=freeze_at, norm="FrozenBN", return_stages=STAGES)
    frozen_prefixes = tuple(f"res{i}." for i in range(1, freeze_at + 1))
    sum(t.sum() for t in model(torch.rand(1, 3, 32, 32)).values()).backward()
    params = dict(model.named_parameters())
    assert params
    for name, p in params.items():
        frozen = name.startswith(frozen_prefixes)
        assert p.requires_grad == (not frozen), name
        assert (p.grad is None) == frozen, name


def test_freeze_everything():
    model = ResNet(18, freeze_at=5, norm="BN", return_stages=STAGES)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not model(torch.rand(1, 3, 32, 32))["res5"].requires_grad


def test_bn_mode_frozen_stages_keep_statistics():
    model = ResNet(18, norm="BN", freeze_at=2, return_stages=STAGES).train()
    assert isinstance(model.res1.bn1, FrozenBatchNorm2d) and isinstance(model.res2[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.res3[0].bn1, nn.BatchNorm2d) and model.res3[0].bn1.weight.requires_grad
    before2 = model.res2[0].bn1.running_mean.clone()
    before3 = model.res3[0].bn1.running_mean.clone()
    model(torch.rand(2, 3, 32, 32))
    assert torch.equal(model.res2[0].bn1.running_mean, before2)
    assert not torch.equal(model.res3[0].bn1.running_mean, before3)


def test_freeze_module_replaces_batchnorm():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), randomize(nn.BatchNorm2d(4)).eval())
    x = torch.rand(1, 3, 4, 4)
    expected = seq(x)
    frozen = freeze_module(seq)
    assert frozen is seq and isinstance(seq[1], FrozenBatchNorm2d)
    assert not seq[0].weight.requires_grad
    assert_rel_close(seq(x), expected, rel=1e-5)


def test_group_norm_variant_trains():
    model = ResNet(18, norm="GN", freeze_at=0, return_stages=("res3",)).train()
    assert isinstance(model.res2[0].bn1, nn.GroupNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(2, 3, 32, 32)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(x)["res3"].pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        assert model.res2[0].bn1.weight.grad is not None and model.res1.conv1.weight.grad is not None
        opt.step()
    assert losses[2] < losses[1] < losses[0]


# --- fuse_frozen_bn ----------------------------------------------------------------------------------------------
def test_fuse_frozen_bn_is_exact():
    model = randomize(ResNet(50, freeze_at=0, return_stages=("res2", "res3")), seed=1).eval()
    fused = fuse_frozen_bn(model)
    assert fused is not model
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    # stem 1 + 7 blocks x 3 + 2 downsample shortcuts
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == \
        sum(isinstance(m, nn.Identity) for m in fused.modules()) == 24
    assert fused.res3[0].downsample[0].bias is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, e in zip(fused(x).values(), model(x).values()):
            assert_rel_close(a, e)
    assert fuse_frozen_bn(model, inplace=True) is model
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def test_fuse_frozen_bn_conv_with_bias_and_untouched_layers():
    seq = randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), FrozenBatchNorm2d(6), nn.ReLU(),
                                  nn.BatchNorm2d(6).eval()))
    x = torch.randn(2, 3, 9, 9)
    fused = fuse_frozen_bn(seq)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], nn.BatchNorm2d)
    with torch.no_grad():
        assert_rel_close(fused(x), seq(x), rel=1e-5)
