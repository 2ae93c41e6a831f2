"""torchvision weights: real torchvision models are saved, converted, loaded into ours, and give the same outputs."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.config import get_cfg
from maskrcnn.modeling.backbone.conv_body import ResNetConvBody
from maskrcnn.utils.weights.formats import WeightsConversionError, convert_to_ours, detect_format
from maskrcnn.utils.weights.torchvision import canonical_to_torchvision, torchvision_to_canonical

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TV_CFG = os.path.join(REPO, "configs", "torchvision", "e2e_mask_rcnn_R-50-FPN.yaml")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (the defaults would hide a mis-mapped buffer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
    return model.eval()


def _body_cfg(depth, conv_stage=5, order="RGB", groups=1, width=64):
    cfg = get_cfg()
    cfg.MODEL.CONV_BODY = f"ResNet.ResNet{depth}_conv{conv_stage}_body"
    cfg.RESNETS.STRIDE_1X1 = False
    cfg.RESNETS.NUM_GROUPS, cfg.RESNETS.WIDTH_PER_GROUP = groups, width
    cfg.PIXEL_ORDER, cfg.PIXEL_SCALE = order, 1.0
    rgb_mean, rgb_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg.PIXEL_MEANS = rgb_mean if order == "RGB" else rgb_mean[::-1]
    cfg.PIXEL_STDS = rgb_std if order == "RGB" else rgb_std[::-1]
    if depth < 50:
        cfg.RESNETS.TRANS_FUNC = "basic_transformation"
    return cfg


def _strip(sd, prefix="Conv_Body."):
    assert all(k.startswith(prefix) for k in sd), [k for k in sd if not k.startswith(prefix)][:5]
    return {k[len(prefix):]: v for k, v in sd.items()}


def _tv_stages(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("arch,depth,groups,width", [("resnet18", 18, 1, 64), ("resnext50_32x4d", 50, 32, 4)])
def test_imagenet_classifier_becomes_our_body(arch, depth, groups, width):
    tv = randomize_norms(getattr(torchvision.models, arch)(weights=None))
    sd = tv.state_dict()
    assert detect_format(sd) == "torchvision"
    cfg = _body_cfg(depth, groups=groups, width=width)
    ours_sd, notes = convert_to_ours(sd, "torchvision", cfg)
    assert any("classifier (fc) was dropped" in n for n in notes)
    assert not any("WARNING" in n for n in notes), notes
    body = ResNetConvBody.from_cfg(cfg).eval()
    body.load_state_dict(_strip(ours_sd), strict=True)
    if groups > 1:
        # Same names as ResNet-50 (covered end to end by the round trip below); the grouped shapes load strictly.
        assert any(f"RESNETS.NUM_GROUPS {groups}" in n and f"RESNETS.WIDTH_PER_GROUP {width}" in n for n in notes)
        return
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = _tv_stages(tv, x)
        got = body(x)
    torch.testing.assert_close(got, ref[-1], rtol=1e-4, atol=1e-4 * ref[-1].abs().max().item())


def test_bgr_config_flips_conv1_so_bgr_input_gives_the_rgb_result():
    tv = randomize_norms(torchvision.models.resnet18(weights=None))
    cfg = _body_cfg(18, conv_stage=4, order="BGR")
    ours_sd, notes = convert_to_ours(tv.state_dict(), "torchvision", cfg)
    assert any("flipped (RGB -> BGR)" in n for n in notes)
    assert not any("WARNING" in n for n in notes), notes  # BGR order with the means/stds reversed is consistent
    w = ours_sd["Conv_Body.res1.conv1.weight"]
    torch.testing.assert_close(w, tv.conv1.weight.detach().flip(1), rtol=0, atol=0)
    # A C4 model's res5 is its box head's (Detectron's ResNet_roi_conv5_head).
    assert torch.equal(ours_sd.pop("Box_Head.res5.1.conv2.weight"), tv.layer4[1].conv2.weight.detach())
    ours_sd = {k: v for k, v in ours_sd.items() if not k.startswith("Box_Head.res5.")}
    body = ResNetConvBody.from_cfg(cfg).eval()
    body.load_state_dict(_strip(ours_sd), strict=True)
    rgb = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = _tv_stages(tv, rgb)[2]
        got = body(rgb.flip(1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # Explicitly refusing the flip keeps torchvision's RGB conv1.
    same, _ = convert_to_ours(tv.state_dict(), "torchvision", cfg, flip_input_channels=False)
    assert torch.equal(same["Conv_Body.res1.conv1.weight"], tv.conv1.weight.detach())


def test_pre_013_names_and_frozen_bn_keys_convert_the_same(tv_model):
    sd = tv_model.state_dict()
    frozen = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    old = {}
    for k, v in frozen.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
            k = k.replace(f"fpn.inner_blocks.{i}.0.", f"fpn.inner_blocks.{i}.").replace(
                f"fpn.layer_blocks.{i}.0.", f"fpn.layer_blocks.{i}.")
        old[k] = v
    a, notes_a = torchvision_to_canonical(sd)
    b, _ = torchvision_to_canonical(frozen)
    c, _ = torchvision_to_canonical({"model": old, "epoch": 3})
    assert any("num_batches_tracked" in n for n in notes_a)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    # The inverse writes current torchvision names, which torchvision itself loads strictly.
    back = canonical_to_torchvision(a)
    assert set(back) == set(frozen) and all(torch.equal(back[k], frozen[k]) for k in back)
    tv_model.load_state_dict(back, strict=True)  # (the values it already has; BatchNorm fills its counters)


def test_v2_and_unknown_tensors_are_reported():
    sd = {"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
          "roi_heads.box_head.0.0.weight": torch.zeros(256, 256, 3, 3)}
    with pytest.raises(WeightsConversionError, match=r"roi_heads\.box_head\.0\.0\.weight.*v2"):
        torchvision_to_canonical(sd)


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None))


def test_maskrcnn_resnet50_fpn_round_trip_through_the_tool(tmp_path, tv_model):
    """A real torchvision Mask R-CNN is saved, converted with tools/convert_weights.py, loaded strictly into
    Generalized_RCNN (torchvision config), and its FPN levels and RPN head outputs match torchvision's."""
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt

    src, out = tmp_path / "tv.pth", tmp_path / "ours.pth"
    torch.save(tv_model.state_dict(), src)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weights.py"), "--src", "torchvision",
                           "--input", str(src), "--output", str(out), "--cfg", TV_CFG],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stdout, proc.stdout  # the torchvision config is exactly torchvision's
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["source"]["format"] == "torchvision"
    cfg = get_cfg()
    cfg.merge_from_file(TV_CFG)
    model = Generalized_RCNN(cfg).eval()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(ckpt["model"]) == expected  # every key mapped, nothing left over
    assert load_ckpt(model, str(out))["skipped"] == []  # the lead's loader: strict, lists any mismatch
    n_tv = sum(1 for k in tv_model.state_dict() if not k.endswith("num_batches_tracked"))
    assert len(ckpt["model"]) == n_tv

    for h, w in ((128, 192), (100, 150)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref = list(tv_model.backbone(x).values())
            got = model.Conv_Body(x)
            assert len(got) == len(ref) == 5
            for level, (a, b) in enumerate(zip(got, ref)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=f"P{level + 2}")
            ref_logits, ref_deltas = tv_model.rpn.head(ref)
            got_logits, got_deltas = model.RPN.head(got)
            for a, b in zip(list(got_logits) + list(got_deltas), list(ref_logits) + list(ref_deltas)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_keypointrcnn_keys_round_trip():
    """keypointrcnn_resnet50_fpn's keypoint head (Sequential conv/ReLU: convs at even indices) and predictor map to
    Keypoint_Head.conv_fcn{1..8} / Keypoint_Outs.kps_score_lowres, and back to the same names and tensors."""
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.weights.ours import ours_to_canonical

    torch.manual_seed(0)
    tv = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    canonical, _ = torchvision_to_canonical(sd)
    assert torch.equal(canonical["kps.conv_fcn1.weight"], sd["roi_heads.keypoint_head.0.weight"])
    assert torch.equal(canonical["kps.conv_fcn8.bias"], sd["roi_heads.keypoint_head.14.bias"])
    assert torch.equal(canonical["kps.score_lowres.weight"], sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"])
    back = canonical_to_torchvision(canonical)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "torchvision", "keypoint_rcnn_R_50_FPN.yaml"))
    model = Generalized_RCNN(cfg)
    ours, notes = convert_to_ours(sd, fmt="torchvision", cfg=cfg, model=model)
    assert not any("WARNING" in n for n in notes), notes
    assert "17 keypoints" in " ".join(notes)
    model.load_state_dict(ours, strict=True)
    assert torch.equal(model.Keypoint_Head.conv_fcn3.weight, sd["roi_heads.keypoint_head.4.weight"])
    assert set(ours_to_canonical(model.state_dict())) == set(canonical)
    # A Mask R-CNN config is told that the file holds a keypoint head it does not use.
    mask_cfg = get_cfg()
    mask_cfg.merge_from_file(TV_CFG)
    _, mask_notes = convert_to_ours(sd, fmt="torchvision", cfg=mask_cfg)
    assert any("MODEL.KEYPOINTS_ON True" in n for n in mask_notes), mask_notes
