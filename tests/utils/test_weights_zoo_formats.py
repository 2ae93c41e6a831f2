"""Detectron (Caffe2), Detectron.pytorch and detectron2 checkpoints built with their published names and layouts.

No real model-zoo file is available here, so each test builds a full-size R-50 (C4 or FPN) Mask R-CNN weight set
with random values under the exact names the reference projects write (Detectron's ``modeling/*.py`` blob names,
Detectron.pytorch's ``detectron_weight_mapping`` and detectron2's ``c2_model_loading``/module names), written
here independently of the converters, then checks that every tensor lands where it should and that the result
loads strictly into ``Generalized_RCNN``.
"""
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torchvision

from maskrcnn.config import get_cfg
from maskrcnn.modeling.backbone.conv_body import FPNConvBody
from maskrcnn.modeling.backbone.resnet import FrozenBatchNorm2d
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.weights.detectron import canonical_to_detectron, detectron_to_canonical, read_detectron_cfg
from maskrcnn.utils.weights.formats import (
    CANONICAL_BN_EPS, WeightsConversionError, convert_to_ours, detect_format, load_as_ours, ours_to_canonical,
)
from maskrcnn.utils.weights.imagenet import load_imagenet_pretrained_weights
from maskrcnn.utils.weights.safe_pickle import load_weights_file
from maskrcnn.utils.weights.torchvision import torchvision_to_canonical

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FPN_CFG = os.path.join(REPO, "configs", "baselines", "e2e_mask_rcnn_R-50-FPN_1x.yaml")
C4_CFG = os.path.join(REPO, "configs", "baselines", "e2e_mask_rcnn_R-50-C4_1x.yaml")
NUM_CLASSES = 81
R50 = [(2, 3, 64, 256), (3, 4, 128, 512), (4, 6, 256, 1024), (5, 3, 512, 2048)]  # stage, blocks, inner, out


# ---------------------------------------------------------------------------------------------------------------
# Reference-name generators (independent of maskrcnn.utils.weights)
# ---------------------------------------------------------------------------------------------------------------
def detectron_blobs(fpn: bool, imagenet: bool = False, seed: int = 0):
    """A Detectron R-50 (FPN or C4) Mask R-CNN blob dict with Detectron's names and Caffe2 layouts."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, out, inp, k, bias=False):
        blobs[name + "_w"] = rng.standard_normal((out, inp, k, k), dtype=np.float32) * 0.05
        if bias:
            blobs[name + "_b"] = rng.standard_normal(out, dtype=np.float32)

    def affine(name, c):
        blobs[name + "_s"] = rng.random(c, dtype=np.float32) + 0.5
        blobs[name + "_b"] = rng.standard_normal(c, dtype=np.float32) * 0.1

    def fc(name, out, inp):
        blobs[name + "_w"] = rng.standard_normal((out, inp), dtype=np.float32) * 0.01
        blobs[name + "_b"] = rng.standard_normal(out, dtype=np.float32)

    conv("conv1", 64, 3, 7)
    affine("res_conv1_bn", 64)
    dim_in = 64
    for stage, n, inner, out in R50:
        for b in range(n):
            p = f"res{stage}_{b}"
            conv(p + "_branch2a", inner, dim_in, 1)
            affine(p + "_branch2a_bn", inner)
            conv(p + "_branch2b", inner, inner, 3)
            affine(p + "_branch2b_bn", inner)
            conv(p + "_branch2c", out, inner, 1)
            affine(p + "_branch2c_bn", out)
            if b == 0:
                conv(p + "_branch1", out, dim_in, 1)
                affine(p + "_branch1_bn", out)
            dim_in = out
    if imagenet:
        fc("pred", 1000, 2048)
        return blobs
    if fpn:
        conv("fpn_inner_res5_2_sum", 256, 2048, 1, bias=True)
        for stage, last, dim in ((4, 5, 1024), (3, 3, 512), (2, 2, 256)):
            conv(f"fpn_inner_res{stage}_{last}_sum_lateral", 256, dim, 1, bias=True)
        for stage, last in ((5, 2), (4, 5), (3, 3), (2, 2)):
            conv(f"fpn_res{stage}_{last}_sum", 256, 256, 3, bias=True)
        conv("conv_rpn_fpn2", 256, 256, 3, bias=True)
        conv("rpn_cls_logits_fpn2", 3, 256, 1, bias=True)
        conv("rpn_bbox_pred_fpn2", 12, 256, 1, bias=True)
        fc("fc6", 1024, 256 * 7 * 7)
        fc("fc7", 1024, 1024)
        fc("cls_score", NUM_CLASSES, 1024)
        fc("bbox_pred", 4 * NUM_CLASSES, 1024)
        for i in range(1, 5):
            conv(f"_[mask]_fcn{i}", 256, 256, 3, bias=True)
        blobs["conv5_mask_w"] = rng.standard_normal((256, 256, 2, 2), dtype=np.float32) * 0.05
        blobs["conv5_mask_b"] = rng.standard_normal(256, dtype=np.float32)
    else:
        conv("conv_rpn", 1024, 1024, 3, bias=True)
        conv("rpn_cls_logits", 15, 1024, 1, bias=True)
        conv("rpn_bbox_pred", 60, 1024, 1, bias=True)
        fc("cls_score", NUM_CLASSES, 2048)
        fc("bbox_pred", 4 * NUM_CLASSES, 2048)
        # ConvTranspose blob layout (in, out, kh, kw), as torch's ConvTranspose2d.
        blobs["conv5_mask_w"] = rng.standard_normal((2048, 256, 2, 2), dtype=np.float32) * 0.05
        blobs["conv5_mask_b"] = rng.standard_normal(256, dtype=np.float32)
    conv("mask_fcn_logits", NUM_CLASSES, 256, 1, bias=True)
    return blobs


def expected_our_key(name: str, fpn: bool):
    """Detectron blob name -> (our key, part) where part is 'w' (the tensor itself), 's'/'b' (AffineChannel)."""
    body = "Conv_Body.conv_body." if fpn else "Conv_Body."
    if name == "conv1_w":
        return f"{body}res1.conv1.weight", "w"
    if name.startswith("res_conv1_bn_"):
        return f"{body}res1.bn1", name[-1]
    m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)(_bn)?_(w|s|b)", name)
    if m:
        stage, block, branch, bn, part = m.groups()
        owner = "Box_Head." if (stage == "5" and not fpn) else body
        idx = {"2a": "1", "2b": "2", "2c": "3"}.get(branch)
        if branch == "1":
            layer = "downsample.1" if bn else "downsample.0.weight"
        else:
            layer = f"bn{idx}" if bn else f"conv{idx}.weight"
        return f"{owner}res{stage}.{block}.{layer}", part
    m = re.fullmatch(r"fpn_inner_res(\d)_\d+_sum(_lateral)?_(w|b)", name)
    if m:
        return f"Conv_Body.fpn.lateral_convs.{int(m.group(1)) - 2}.{'weight' if m.group(3) == 'w' else 'bias'}", "w"
    m = re.fullmatch(r"fpn_res(\d)_\d+_sum_(w|b)", name)
    if m:
        return f"Conv_Body.fpn.output_convs.{int(m.group(1)) - 2}.{'weight' if m.group(2) == 'w' else 'bias'}", "w"
    m = re.fullmatch(r"_\[mask\]_fcn(\d)_(w|b)", name)
    if m:
        return f"Mask_Head.mask_fcn{m.group(1)}.{'weight' if m.group(2) == 'w' else 'bias'}", "w"
    simple = {"conv_rpn_fpn2": "RPN.head.RPN_conv", "rpn_cls_logits_fpn2": "RPN.head.RPN_cls_score",
              "rpn_bbox_pred_fpn2": "RPN.head.RPN_bbox_pred", "conv_rpn": "RPN.head.RPN_conv",
              "rpn_cls_logits": "RPN.head.RPN_cls_score", "rpn_bbox_pred": "RPN.head.RPN_bbox_pred",
              "fc6": "Box_Head.fc6", "fc7": "Box_Head.fc7", "cls_score": "Box_Outs.cls_score",
              "bbox_pred": "Box_Outs.bbox_pred", "conv5_mask": "Mask_Head.conv5_mask",
              "mask_fcn_logits": "Mask_Outs.mask_fcn_logits"}
    base, what = name.rsplit("_", 1)
    return f"{simple[base]}.{'weight' if what == 'w' else 'bias'}", "w"


def _cfg(path, **overrides):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    for k, v in overrides.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = getattr(node, p)
        setattr(node, parts[-1], v)
    return cfg


@pytest.fixture(scope="module")
def fpn_setup():
    """(config, Detectron blobs, model): one model per layout, which the tests load into strictly."""
    cfg = _cfg(FPN_CFG)
    return cfg, detectron_blobs(fpn=True), Generalized_RCNN(cfg)


@pytest.fixture(scope="module")
def c4_setup():
    cfg = _cfg(C4_CFG)
    return cfg, detectron_blobs(fpn=False), Generalized_RCNN(cfg)


def _check_lands(blobs, ours, fpn):
    """Every blob is where Detectron's semantics put it; every converted tensor comes from a blob."""
    covered = set()
    for name, value in blobs.items():
        key, part = expected_our_key(name, fpn)
        if part == "w":
            assert torch.equal(ours[key], torch.from_numpy(value)), key
            covered.add(key)
        else:
            target = "weight" if part == "s" else "bias"
            assert torch.equal(ours[f"{key}.{target}"], torch.from_numpy(value)), (name, key)
            assert torch.equal(ours[f"{key}.running_mean"], torch.zeros(value.shape[0]))
            covered.update(f"{key}.{b}" for b in ("weight", "bias", "running_mean", "running_var"))
    extra = set(ours) - covered
    return extra


# ---------------------------------------------------------------------------------------------------------------
# Detectron
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_detectron_blobs_land_where_they_should_and_load_strictly(which, fpn_setup, c4_setup):
    cfg, blobs, model = fpn_setup if which == "fpn" else c4_setup
    obj = {"blobs": dict(blobs, conv1_w_momentum=np.zeros(1, np.float32), res2_0_branch2a_b=np.zeros(64, np.float32)),
           "cfg": "MODEL:\n  NUM_CLASSES: 81\n"}
    assert detect_format(obj, "model_final.pkl") == "detectron"
    ours, notes = convert_to_ours(obj, None, cfg)
    extra = _check_lands(blobs, ours, fpn=which == "fpn")
    if which == "c4":
        # Our C4 mask head may hold the box head's res5 (Detectron's v0upshare shares it): a copy of the same blobs.
        assert all(k.startswith("Mask_Head.res5.") and torch.equal(ours[k], ours["Box_Head." + k[len("Mask_Head."):]])
                   for k in extra), sorted(extra)[:5]
    else:
        assert not extra, sorted(extra)[:5]
    assert set(ours) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(ours, strict=True)
    assert any("dropped 2 blob" in n for n in notes)
    assert any("MODEL.LEGACY_PLUS_ONE True" in n for n in notes)
    assert any("WARNING" in n and "LEGACY_PLUS_ONE" in n for n in notes)  # the baseline config keeps it False


def test_detectron_v0up_mask_head_gets_its_own_res5(c4_setup):
    """v0up (a C4 mask head with its own res5): ``_[mask]_res5_*`` blobs when the file has them, else res5's
    (Detectron loads ``_[mask]_foo`` from ``foo``)."""
    _, blobs, _ = c4_setup
    cfg = _cfg(C4_CFG, MRCNN__ROI_MASK_HEAD="mask_rcnn_heads.mask_rcnn_fcn_head_v0up")
    model = Generalized_RCNN(cfg)
    ours, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg, model=model)
    model.load_state_dict(ours, strict=True)
    assert torch.equal(ours["Mask_Head.res5.1.conv2.weight"], torch.from_numpy(blobs["res5_1_branch2b_w"]))
    own = dict(blobs)
    own.update({"_[mask]_" + k: v + 1 for k, v in blobs.items() if k.startswith("res5_")})
    ours, _ = convert_to_ours({"blobs": own}, "detectron", cfg)
    model.load_state_dict(ours, strict=True)
    assert torch.equal(ours["Mask_Head.res5.1.conv2.weight"], torch.from_numpy(blobs["res5_1_branch2b_w"] + 1))
    assert torch.equal(ours["Box_Head.res5.1.conv2.weight"], torch.from_numpy(blobs["res5_1_branch2b_w"]))


def test_caffe2_affine_becomes_a_frozen_bn_with_exactly_that_scale_and_shift(fpn_setup):
    cfg, blobs, _ = fpn_setup
    ours, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
    bn = FrozenBatchNorm2d(256)
    bn.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in ours.items()
                        if k.startswith("Conv_Body.conv_body.res2.0.downsample.1.")})
    assert bn.eps == CANONICAL_BN_EPS
    x = torch.randn(2, 256, 5, 5)
    s, b = torch.from_numpy(blobs["res2_0_branch1_bn_s"]), torch.from_numpy(blobs["res2_0_branch1_bn_b"])
    scale, shift = bn.scale_and_shift()
    assert torch.equal(scale, s) and torch.equal(shift, b)
    assert torch.equal(bn(x), x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))


def test_detectron_conv1_flip_for_an_rgb_config(fpn_setup):
    cfg, blobs, _ = fpn_setup
    rgb = cfg.clone()
    rgb.defrost()
    rgb.PIXEL_ORDER = "RGB"
    rgb.PIXEL_MEANS = [122.7717, 115.9465, 102.9801]
    ours, notes = convert_to_ours({"blobs": blobs}, "detectron", rgb)
    w = torch.from_numpy(blobs["conv1_w"])
    assert torch.equal(ours["Conv_Body.conv_body.res1.conv1.weight"], w[:, [2, 1, 0]])
    assert any("flipped (BGR -> RGB)" in n for n in notes)
    assert any("PIXEL_MEANS [122.7717, 115.9465, 102.9801]" in n for n in notes)
    assert not any("PIXEL_ORDER is" in n for n in notes)
    # A BGR image through the original conv1 equals the RGB image through the flipped one.
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, w),
                               torch.nn.functional.conv2d(x.flip(1), ours["Conv_Body.conv_body.res1.conv1.weight"]))
    kept, _ = convert_to_ours({"blobs": blobs}, "detectron", rgb, flip_input_channels=False)
    assert torch.equal(kept["Conv_Body.conv_body.res1.conv1.weight"], w)


def test_detectron_inverse_writes_the_published_names(fpn_setup, c4_setup):
    for _, blobs, _ in (fpn_setup, c4_setup):
        canonical, _ = detectron_to_canonical({"blobs": blobs})
        back = canonical_to_detectron(canonical)
        assert set(back) == set(blobs)
        assert all(np.allclose(back[k], blobs[k], atol=1e-6) for k in blobs)


def test_our_checkpoints_are_detected_and_export_back_to_canonical(fpn_setup, c4_setup):
    for cfg, blobs, model in (fpn_setup, c4_setup):
        canonical, _ = detectron_to_canonical({"blobs": blobs})
        ours, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
        for wrapped in (ours, {"model": ours, "iteration": 5}, {f"module.{k}": v for k, v in ours.items()}):
            assert detect_format(wrapped) == "ours"
        same, notes = convert_to_ours({"model": ours}, None, cfg)
        assert notes == [] and same.keys() == ours.keys()
        back = ours_to_canonical(ours)
        assert back.keys() == canonical.keys() and all(torch.equal(back[k], canonical[k]) for k in back)


def test_detectron_groupnorm_fpn_blobs_fill_a_groupnorm_fpn(fpn_setup):
    _, blobs, _ = fpn_setup
    rng = np.random.default_rng(3)
    gn = {}
    for name, v in blobs.items():
        m = re.fullmatch(r"(fpn_(?:inner_)?res\d_\d+_sum(?:_lateral)?)_(w|b)", name)
        if m is None:
            gn[name] = v
        elif m.group(2) == "w":  # ConvGN: no conv bias, a GroupNorm scale and shift
            gn[name] = v
            gn[m.group(1) + "_gn_s"] = rng.random(256, dtype=np.float32)
            gn[m.group(1) + "_gn_b"] = rng.random(256, dtype=np.float32)
    cfg = _cfg(FPN_CFG, FPN__USE_GN=True)
    ours, _ = convert_to_ours({"blobs": gn}, "detectron", cfg)
    body = FPNConvBody.from_cfg(cfg)
    body.load_state_dict({k[len("Conv_Body."):]: v for k, v in ours.items() if k.startswith("Conv_Body.")}, strict=True)
    assert torch.equal(body.fpn.lateral_convs[2][1].weight, torch.from_numpy(gn["fpn_inner_res4_5_sum_lateral_gn_s"]))
    assert torch.equal(body.fpn.output_convs[3][0].weight, torch.from_numpy(gn["fpn_res5_2_sum_w"]))


def test_unknown_and_incomplete_detectron_blobs_are_errors(fpn_setup):
    cfg, blobs, _ = fpn_setup
    # Detectron's KRCNN.USE_DECONV head (kps_deconv) is not supported: named in the error.
    with pytest.raises(WeightsConversionError, match=r"kps_deconv_w"):
        convert_to_ours({"blobs": dict(blobs, kps_deconv_w=np.zeros(3, np.float32))}, "detectron", cfg)
    partial = {k: v for k, v in blobs.items() if k != "res3_1_branch2b_bn_b"}
    with pytest.raises(WeightsConversionError, match=r"res3\.1\.bn2"):
        convert_to_ours({"blobs": partial}, "detectron", cfg)


def test_detectron_saved_cfg_is_read_without_importing_anything():
    text = ("!!python/object/new:detectron.utils.collections.AttrDict\n"
            "dictitems:\n"
            "  MODEL: !!python/object/new:detectron.utils.collections.AttrDict\n"
            "    dictitems: {CONV_BODY: FPN.add_fpn_ResNet50_conv5_body, NUM_CLASSES: 81}\n"
            "    state: {__immutable__: true}\n"
            "  PIXEL_MEANS: !!python/object/apply:numpy.core.multiarray._reconstruct\n"
            "    args: [1, 2]\n"
            "state: {__immutable__: true}\n")
    cfg = read_detectron_cfg(text)
    assert cfg["MODEL"] == {"CONV_BODY": "FPN.add_fpn_ResNet50_conv5_body", "NUM_CLASSES": 81}
    assert "detectron" not in sys.modules
    _, notes = detectron_to_canonical({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}, "cfg": text})
    assert any("MODEL.NUM_CLASSES=81" in n for n in notes)
    assert any("predates MODEL.BBOX_REG_WEIGHTS" in n for n in notes)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet Caffe2 backbones (R-50.pkl)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagenet_pkl(tmp_path_factory):
    blobs = detectron_blobs(fpn=False, imagenet=True, seed=1)
    blobs["conv1_b"] = np.zeros(64, np.float32)
    path = tmp_path_factory.mktemp("imagenet") / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f, protocol=2)  # ImageNet files hold the blobs at the top level
    return blobs, path


@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_imagenet_r50_pkl_initialises_the_backbone_only(tmp_path, which, imagenet_pkl, fpn_setup, c4_setup):
    blobs, path = imagenet_pkl
    _, _, model = fpn_setup if which == "fpn" else c4_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    notes = load_imagenet_pretrained_weights(model, path)
    after = model.state_dict()
    fpn = which == "fpn"
    loaded = set()
    for name, value in blobs.items():
        if name.startswith(("pred_", "conv1_b")):
            continue
        key, part = expected_our_key(name, fpn)
        key = key if part == "w" else f"{key}.{'weight' if part == 's' else 'bias'}"
        assert torch.equal(after[key], torch.from_numpy(value)), key
        loaded.add(key)
    if not fpn:
        assert torch.equal(after["Box_Head.res5.2.conv3.weight"], torch.from_numpy(blobs["res5_2_branch2c_w"]))
    untouched = [k for k in after if k.startswith(("RPN.", "Box_Outs.", "Mask_Outs.", "Conv_Body.fpn."))]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
    assert any("backbone tensors loaded" in n for n in notes)
    if fpn:
        return
    # A file for another architecture (a basic-block ResNet-18 in Caffe2 names) is refused with what does not fit.
    r18 = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump(canonical_to_detectron(torchvision_to_canonical(r18)[0]), f, protocol=2)
    with pytest.raises(WeightsConversionError, match=r"missing in the file \(\d+\): .*res5\.0\.conv3\.weight.*"
                                                     r"shape mismatch \(\d+\): .*res2\.0\.conv1\.weight: file "
                                                     r"\(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"):
        load_imagenet_pretrained_weights(model, path)


# ---------------------------------------------------------------------------------------------------------------
# Detectron.pytorch (reference mapping: its modules' detectron_weight_mapping, inverted)
# ---------------------------------------------------------------------------------------------------------------
def detectron_pytorch_state_dict(blobs, fpn):
    """Detectron.pytorch's state dict holding the same weights as Detectron ``blobs``."""
    body = "Conv_Body.conv_body." if fpn else "Conv_Body."
    sd = {}
    for name, v in blobs.items():
        t = torch.from_numpy(v)
        if name == "conv1_w":
            sd[f"{body}res1.conv1.weight"] = t
        elif name.startswith("res_conv1_bn_"):
            sd[f"{body}res1.bn1.{'weight' if name.endswith('_s') else 'bias'}"] = t
        elif re.fullmatch(r"res\d_\d+_branch.*", name):
            m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)(_bn)?_(w|s|b)", name)
            stage, block, branch, bn, part = m.groups()
            owner = "Box_Head." if stage == "5" and not fpn else body
            what = "weight" if part in ("w", "s") else "bias"
            if branch == "1":
                sd[f"{owner}res{stage}.{block}.downsample.{1 if bn else 0}.{what}"] = t
            else:
                i = {"2a": 1, "2b": 2, "2c": 3}[branch]
                sd[f"{owner}res{stage}.{block}.{'bn' if bn else 'conv'}{i}.{what}"] = t
                if not fpn and stage == "5":  # v0upshare: Mask_Head.res5 is Box_Head.res5, saved twice
                    sd[f"Mask_Head.res{stage}.{block}.{'bn' if bn else 'conv'}{i}.{what}"] = t
            if not fpn and stage == "5" and branch == "1":
                sd[f"Mask_Head.res5.{block}.downsample.{1 if bn else 0}.{what}"] = t
        else:
            what = "weight" if name.endswith("_w") else "bias"
            base = name[:-2]
            m = re.fullmatch(r"fpn_inner_res(\d)_\d+_sum(_lateral)?", base)
            n = re.fullmatch(r"fpn_res(\d)_\d+_sum", base)
            k = re.fullmatch(r"_\[mask\]_fcn(\d)", base)
            if m:
                lvl = int(m.group(1))
                sd["Conv_Body.conv_top." + what if lvl == 5 else
                   f"Conv_Body.topdown_lateral_modules.{4 - lvl}.conv_lateral.{what}"] = t
            elif n:
                sd[f"Conv_Body.posthoc_modules.{5 - int(n.group(1))}.{what}"] = t
            elif k:
                sd[f"Mask_Head.conv_fcn.{2 * (int(k.group(1)) - 1)}.{what}"] = t
            else:
                names = {"conv_rpn_fpn2": "RPN.FPN_RPN_conv", "rpn_cls_logits_fpn2": "RPN.FPN_RPN_cls_score",
                         "rpn_bbox_pred_fpn2": "RPN.FPN_RPN_bbox_pred", "conv_rpn": "RPN.RPN_conv",
                         "rpn_cls_logits": "RPN.RPN_cls_score", "rpn_bbox_pred": "RPN.RPN_bbox_pred",
                         "fc6": "Box_Head.fc1", "fc7": "Box_Head.fc2", "cls_score": "Box_Outs.cls_score",
                         "bbox_pred": "Box_Outs.bbox_pred", "mask_fcn_logits": "Mask_Outs.classify",
                         "conv5_mask": "Mask_Head.upconv" if fpn else "Mask_Head.upconv5"}
                sd[f"{names[base]}.{what}"] = t
    return sd


@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_detectron_pytorch_checkpoint_converts_like_the_detectron_blobs(tmp_path, which, fpn_setup, c4_setup):
    cfg, blobs, model = fpn_setup if which == "fpn" else c4_setup
    fpn = which == "fpn"
    sd = detectron_pytorch_state_dict(blobs, fpn)
    path = tmp_path / "model_step89999.pth"
    torch.save({"step": 89999, "train_size": 117266, "batch_size": 16, "model": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "params": [0, 1]}]}}, path)
    ours, notes, fmt = load_as_ours(path, cfg)
    assert fmt == "detectron.pytorch"
    reference, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
    assert ours.keys() == reference.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=0, msg=k)
    model.load_state_dict(ours, strict=True)
    if not fpn:
        assert any("v0upshare" in n for n in notes)


def test_detectron_pytorch_softmax_rpn_is_refused(fpn_setup):
    _, blobs, _ = fpn_setup
    sd = detectron_pytorch_state_dict(blobs, True)
    sd["RPN.FPN_RPN_cls_score.weight"] = torch.zeros(6, 256, 1, 1)
    sd["RPN.FPN_RPN_cls_score.bias"] = torch.zeros(6)
    with pytest.raises(WeightsConversionError, match="softmax RPN"):
        convert_to_ours({"model": sd}, "detectron.pytorch")


# ---------------------------------------------------------------------------------------------------------------
# detectron2 (reference mapping: c2_model_loading's renames and class/anchor layouts)
# ---------------------------------------------------------------------------------------------------------------
def detectron2_state_dict(blobs, fpn):
    """detectron2's state dict for the network Detectron ``blobs`` describe (a model-zoo file would have the same
    names; the values here are Detectron's, moved to detectron2's class and anchor layouts)."""
    body = "backbone.bottom_up." if fpn else "backbone."
    sd = {}
    for name, v in blobs.items():
        t = torch.from_numpy(v)
        what = {"w": "weight", "s": "weight", "b": "bias"}[name[-1]]
        if name == "conv1_w":
            sd[f"{body}stem.conv1.weight"] = t
            continue
        if name.startswith("res_conv1_bn_"):
            sd[f"{body}stem.conv1.norm.{what}"] = t
            sd[f"{body}stem.conv1.norm.running_mean"] = torch.zeros_like(t)
            sd[f"{body}stem.conv1.norm.running_var"] = torch.ones_like(t) - 1e-5
            continue
        m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)(_bn)?_(w|s|b)", name)
        if m:
            stage, block, branch, bn, _ = m.groups()
            owner = "roi_heads." if stage == "5" and not fpn else body
            layer = "shortcut" if branch == "1" else f"conv{ {'2a': 1, '2b': 2, '2c': 3}[branch]}"
            sd[f"{owner}res{stage}.{block}.{layer}{'.norm' if bn else ''}.{what}"] = t
            if bn:  # detectron2's FrozenBN has statistics; C2 affine = mean 0, var 1 - eps
                sd[f"{owner}res{stage}.{block}.{layer}.norm.running_mean"] = torch.zeros_like(t)
                sd[f"{owner}res{stage}.{block}.{layer}.norm.running_var"] = torch.ones_like(t) - 1e-5
            continue
        base = name[:-2]
        m = re.fullmatch(r"fpn_inner_res(\d)_\d+_sum(_lateral)?", base)
        n = re.fullmatch(r"fpn_res(\d)_\d+_sum", base)
        k = re.fullmatch(r"_\[mask\]_fcn(\d)", base)
        if m:
            sd[f"backbone.fpn_lateral{m.group(1)}.{what}"] = t
        elif n:
            sd[f"backbone.fpn_output{n.group(1)}.{what}"] = t
        elif k:
            sd[f"roi_heads.mask_head.mask_fcn{k.group(1)}.{what}"] = t
        elif base == "cls_score":
            sd[f"roi_heads.box_predictor.cls_score.{what}"] = torch.cat([t[1:], t[:1]])  # background last
        elif base == "bbox_pred":
            sd[f"roi_heads.box_predictor.bbox_pred.{what}"] = t[4:]  # no background deltas
        elif base == "mask_fcn_logits":
            sd[f"roi_heads.mask_head.predictor.{what}"] = t[1:]  # no background mask
        elif base in ("rpn_cls_logits", "rpn_bbox_pred"):  # C4: 5 sizes x 3 ratios
            per = 1 if base == "rpn_cls_logits" else 4
            sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
            detectron_order = [(r, s) for r in ratios for s in sizes]  # generate_anchors: ratio-major
            d2_order = [(r, s) for s in sizes for r in ratios]  # DefaultAnchorGenerator: size-major
            idx = [detectron_order.index(a) for a in d2_order]
            rows = torch.cat([t[i * per:(i + 1) * per] for i in idx])
            sd[f"proposal_generator.rpn_head.{'objectness_logits' if per == 1 else 'anchor_deltas'}.{what}"] = rows
        else:
            names = {"conv_rpn_fpn2": "proposal_generator.rpn_head.conv",
                     "conv_rpn": "proposal_generator.rpn_head.conv",
                     "rpn_cls_logits_fpn2": "proposal_generator.rpn_head.objectness_logits",
                     "rpn_bbox_pred_fpn2": "proposal_generator.rpn_head.anchor_deltas",
                     "fc6": "roi_heads.box_head.fc1", "fc7": "roi_heads.box_head.fc2",
                     "conv5_mask": "roi_heads.mask_head.deconv"}
            sd[f"{names[base]}.{what}"] = t
    sd["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    sd["pixel_std"] = torch.ones(3, 1, 1)
    return sd


@pytest.mark.parametrize("which", ["fpn", "c4"])
def test_detectron2_zoo_file_converts_to_the_same_network(tmp_path, which, fpn_setup, c4_setup):
    cfg, blobs, model = fpn_setup if which == "fpn" else c4_setup
    sd = detectron2_state_dict(blobs, which == "fpn")
    zoo = {"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "Detectron2 Model Zoo"}
    if which == "fpn":  # through a real file once (the C4 case converts the loaded dict directly, to save time)
        path = tmp_path / "model_final_f10217.pkl"
        with open(path, "wb") as f:
            pickle.dump(zoo, f)
        ours, notes, fmt = load_as_ours(path, cfg)
    else:
        fmt = detect_format(zoo)
        ours, notes = convert_to_ours(zoo, fmt, cfg)
    assert fmt == "detectron2"
    reference, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
    assert ours.keys() == reference.keys()
    zero_bg = {"Box_Outs.bbox_pred.weight": 4, "Box_Outs.bbox_pred.bias": 4, "Mask_Outs.mask_fcn_logits.weight": 1,
               "Mask_Outs.mask_fcn_logits.bias": 1}
    for k in ours:
        if k in zero_bg:  # detectron2 has no background rows; they come back as zeros
            n = zero_bg[k]
            assert not ours[k][:n].any()
            torch.testing.assert_close(ours[k][n:], reference[k][n:], rtol=0, atol=0, msg=k)
        else:
            torch.testing.assert_close(ours[k], reference[k], rtol=0, atol=1e-7, msg=k)
    model.load_state_dict(ours, strict=True)
    assert any("pixel_mean=[103.53, 116.28, 123.675]" in n for n in notes)
    assert any("FAST_RCNN.ROI_XFORM_ALIGNED True" in n for n in notes)
    if which == "c4":
        assert any("reordered from size-major" in n for n in notes)


def test_detectron2_background_class_moves_from_last_to_first(fpn_setup):
    cfg, blobs, _ = fpn_setup
    sd = detectron2_state_dict(blobs, True)
    w = sd["roi_heads.box_predictor.cls_score.weight"]
    ours, _ = convert_to_ours({"model": sd, "__author__": "Detectron2 Model Zoo"}, None, cfg)
    assert torch.equal(ours["Box_Outs.cls_score.weight"][0], w[-1])  # background
    assert torch.equal(ours["Box_Outs.cls_score.weight"][1:], w[:-1])  # person .. toothbrush
    d2_box = sd["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(ours["Box_Outs.bbox_pred.weight"][4:8], d2_box[0:4])  # class 1's deltas


def _convert_weights_main():
    """tools/convert_weights.py's main (the torchvision test runs it as a subprocess; here in-process, faster)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_weights
    finally:
        sys.path.pop(0)
    return convert_weights.main


def test_convert_weights_tool_writes_a_weights_only_checkpoint(tmp_path, capsys, fpn_setup):
    cfg, blobs, model = fpn_setup
    src = tmp_path / "model_final.pkl"
    with open(src, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    out = tmp_path / "ours.pth"
    main = _convert_weights_main()
    assert main(["--src", "detectron", "--input", str(src), "--output", str(out), "--cfg", FPN_CFG]) == 0
    assert "LEGACY_PLUS_ONE" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) == {"model", "cfg", "source"} and ckpt["source"]["format"] == "detectron"
    assert "CONV_BODY: FPN.fpn_ResNet50_conv5_body" in ckpt["cfg"]
    assert detect_format(load_weights_file(out)) == "ours"
    model.load_state_dict(ckpt["model"], strict=True)
    assert main(["--src", "detectron2", "--input", str(src), "--output", str(tmp_path / "x.pth")]) == 2
    assert "given as 'detectron2' but look like a 'detectron' file" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
