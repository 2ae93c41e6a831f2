"""TEST.QUANTIZE int8 (maskrcnn.engine.quantize): the tiny model runs quantized (body, FPN and, with
TEST.QUANTIZE_HEADS, the heads' feature layers), its features stay close to fp32, it returns full detections, and
impossible settings raise ConfigError naming the key."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_speed import images, randomize_frozen_bn, tiny_cfg, tiny_model  # noqa: E402

from maskrcnn.config import ConfigError  # noqa: E402
from maskrcnn.engine import quantize  # noqa: E402
from maskrcnn.engine.quantize import QuantizedLayer  # noqa: E402
from maskrcnn.engine.speed import prepare_for_inference  # noqa: E402


def calib():
    g = torch.Generator().manual_seed(7)
    return [torch.rand(3, 96, 120, generator=g)] + images()


@pytest.fixture(scope="module")
def models():
    fp32 = tiny_model()
    int8 = prepare_for_inference(copy.deepcopy(fp32), quantize="int8", calib_images=calib())
    prepare_for_inference(fp32)
    return fp32, int8


def _is_int8(module):
    # torch.ao.nn.quantized (Conv2d, Linear, ...) and torch.ao.nn.intrinsic.quantized (ConvReLU2d, LinearReLU, ...)
    return any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
               for m in module.modules())


def _fused_int8_stack(head):
    """The head's int8 stack: one graph whose layers carry their ReLUs (ConvReLU2d / LinearReLU), and no layer of
    the head quantized on its own."""
    stack = head.fused_stack
    kinds = [type(m).__name__ for m in stack.modules()]
    assert type(stack).__name__ == "GraphModule" and _is_int8(stack), kinds
    assert not any(isinstance(m, QuantizedLayer) for m in head.modules())
    return kinds


def test_int8_replaces_stages_and_fpn_convs(models):
    _, int8 = models
    body = int8.Conv_Body
    assert all(type(getattr(body.conv_body, n)).__name__ == "GraphModule" for n in ("res1", "res2", "res5"))
    assert all(isinstance(c, QuantizedLayer) and _is_int8(c) for c in body.fpn.output_convs)
    assert all(isinstance(c, QuantizedLayer) and _is_int8(c) for c in body.fpn.lateral_convs)
    assert _is_int8(body.conv_body.res3)
    assert quantize.is_quantized(int8)
    assert torch.backends.quantized.engine == quantize.quantized_engine()  # what the layers were packed for


def test_int8_heads_feature_layers_and_not_predictors(models):
    fp32, int8 = models
    heads = int8.roi_heads
    rpn = int8.RPN.head
    assert isinstance(rpn.RPN_conv, QuantizedLayer) and _is_int8(rpn.RPN_conv)
    assert type(rpn.RPN_cls_score) is torch.nn.Conv2d and type(rpn.RPN_bbox_pred) is torch.nn.Conv2d
    # fc6 + ReLU and fc7 + ReLU in one int8 graph; the float layers stay as they were (shape attributes intact).
    assert _fused_int8_stack(heads.Box_Head).count("LinearReLU") == 2
    assert heads.Box_Head.fc6.in_features == fp32.roi_heads.Box_Head.fc6.in_features
    # Every 3x3 conv with its ReLU, then conv5_mask, in one graph.
    kinds = _fused_int8_stack(heads.Mask_Head)
    assert kinds.count("ConvReLU2d") == fp32.roi_heads.Mask_Head.num_convs and "ConvTranspose2d" in kinds
    for outs in (heads.Box_Outs, heads.Mask_Outs):  # the predictors stay fp32
        assert not any(isinstance(m, QuantizedLayer) or _is_int8(m) for m in outs.modules())
    # TEST.QUANTIZE_HEADS False: body and FPN only.
    body_only = prepare_for_inference(tiny_model(), quantize="int8", quantize_heads=False, calib_images=calib())
    assert _is_int8(body_only.Conv_Body)
    assert not any(isinstance(m, QuantizedLayer) for m in body_only.roi_heads.modules())
    assert body_only.roi_heads.Mask_Head.fused_stack is None
    assert type(body_only.RPN.head.RPN_conv) is torch.nn.Conv2d
    cfg = tiny_model().cfg.clone()
    cfg.merge_from_list(["TEST.QUANTIZE", "int8", "TEST.QUANTIZE_HEADS", False])
    from_cfg = prepare_for_inference(tiny_model(), cfg, calib_images=calib())
    assert type(from_cfg.RPN.head.RPN_conv) is torch.nn.Conv2d


@pytest.mark.parametrize("extra", [
    {"MODEL.CASCADE_ON": True, "MODEL.CLS_AGNOSTIC_BBOX_REG": True},
    {"MODEL.MASK_ON": False, "MODEL.KEYPOINTS_ON": True, "KRCNN.NUM_STACKED_CONVS": 2, "KRCNN.CONV_HEAD_DIM": 16,
     "KRCNN.NUM_KEYPOINTS": 4, "KRCNN.ROI_XFORM_RESOLUTION": 7, "KRCNN.HEATMAP_SIZE": 28},
], ids=["cascade", "keypoints"])
def test_int8_cascade_and_keypoint_heads(extra):
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

    torch.manual_seed(0)
    model = randomize_frozen_bn(Generalized_RCNN(tiny_cfg(**extra)), 0).eval()
    with torch.no_grad():
        ref = model(images())
    int8 = prepare_for_inference(model, quantize="int8", calib_images=calib())
    heads = int8.roi_heads
    if "MODEL.CASCADE_ON" in extra:  # every stage's fc6/fc7, as one graph per stage
        assert all(_fused_int8_stack(stage).count("LinearReLU") == 2 for stage in heads.Box_Head)
    else:
        assert _fused_int8_stack(heads.Keypoint_Head).count("ConvReLU2d") == 2
        assert not any(isinstance(m, QuantizedLayer) or _is_int8(m) for m in heads.Keypoint_Outs.modules())
    with torch.no_grad():
        out = int8(images())
    for a, b in zip(ref, out):
        assert set(b) == set(a) and b["boxes"].shape[0] == a["boxes"].shape[0]
        if "keypoints" in a:
            assert b["keypoints"].shape == a["keypoints"].shape and torch.isfinite(b["keypoints"]).all()


def test_activation_range_follows_vnni(monkeypatch):
    # Without VNNI the x86 kernels sum pairs in saturating 16 bits: PyTorch's 7-bit activations. With it, 8 bits.
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    assert quantize._qconfig_mapping().global_qconfig.activation.p.keywords["reduce_range"] is True
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: True)
    mapping = quantize._qconfig_mapping()
    assert mapping.global_qconfig.activation.p.keywords["reduce_range"] is False
    deconv = mapping.object_type_qconfigs[torch.nn.ConvTranspose2d]
    assert deconv.activation.p.keywords["reduce_range"] is False
    assert deconv.weight.p.keywords["qscheme"] == torch.per_tensor_symmetric  # its own weight scheme is kept


def test_int8_features_close_to_fp32(models):
    fp32, int8 = models
    with torch.no_grad():
        x = fp32.preprocess(images())[0].tensors  # the normalized batch the body sees (calibrated on it)
        a, b = fp32.Conv_Body(x), int8.Conv_Body(x)
    for fa, fb in zip(a, b):
        rel = float((fa - fb).abs().mean() / fa.abs().mean())
        # Random weights (no trained ranges), 3 calibration images, 18 layers of rounding: measured 0.11 of the mean
        # magnitude; an unquantized or badly calibrated body (e.g. ranges of un-normalized input) gives 1.0.
        assert rel < 0.2, rel


def test_int8_model_returns_full_detections(models):
    # Only the structure is checked here: the random tiny model's detection ranking is decided by near-ties
    # (measured: its top fp32 boxes are not among the int8 ones), so closeness is asserted on the features above
    # and, for detections, by the AP of a trained model (docs/benchmarks.md, "int8: body, FPN and heads").
    fp32, int8 = models
    with torch.no_grad():
        ra, rb = fp32(images()), int8(images())
    for im, a, b in zip(images(), ra, rb):
        assert b["boxes"].shape[0] == a["boxes"].shape[0] > 0
        assert b["masks"].shape[0] == b["boxes"].shape[0] and b["masks"].shape[-2:] == im.shape[-2:]
        assert torch.isfinite(b["boxes"]).all() and bool(((b["scores"] >= 0) & (b["scores"] <= 1)).all())
    # No detection left (every score below the threshold): the int8 mask head runs on an empty batch.
    int8.roi_heads.score_thresh, saved = 1.01, int8.roi_heads.score_thresh
    try:
        with torch.no_grad():
            empty = int8(images()[:1])[0]
    finally:
        int8.roi_heads.score_thresh = saved
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape[0] == 0


def test_int8_errors():
    with pytest.raises(ConfigError, match="calibration images"):
        prepare_for_inference(tiny_model(), quantize="int8")
    with pytest.raises(ConfigError, match="TEST.AMP"):
        prepare_for_inference(tiny_model(), quantize="int8", amp="bf16", calib_images=calib())
    with pytest.raises(ConfigError, match="quantize = 'int4'"):
        prepare_for_inference(tiny_model(), quantize="int4", calib_images=calib())


PHOTO_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "PennFudanPed-sample",
                         "PNGImages")


def test_int8_torchscript_export_cli(tmp_path, capsys):
    # maskrcnn-export --set TEST.QUANTIZE int8 --calib ...: the traced int8 model equals the eager int8 one.
    from maskrcnn.cli.export import main

    photos = [os.path.join(PHOTO_DIR, n) for n in sorted(os.listdir(PHOTO_DIR))[:3]]
    ckpt, cfg = tmp_path / "model.pth", tmp_path / "cfg.yaml"
    torch.save({"model": tiny_model().state_dict(), "iteration": 0}, ckpt)
    cfg.write_text(tiny_cfg().dump())
    base = ["--cfg", str(cfg), "--load_ckpt", str(ckpt), "--set", "TEST.QUANTIZE", "int8"]
    out = tmp_path / "int8.ts"
    rc = main(base + ["--format", "torchscript", "--output", str(out), "--calib"] + photos[:2]
              + ["--check", photos[2]])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "outside tolerance" not in printed and "check " in printed
    graph = str(torch.jit.load(str(out)).inlined_graph)
    assert "quantized::conv2d" in graph and "quantized::linear" in graph  # body and box head in int8
    # ONNX of a quantized model, and int8 without calibration images, are refused with the fix in the message.
    assert main(base + ["--format", "onnx", "--output", str(tmp_path / "m.onnx"), "--calib", photos[0]]) == 2
    assert "format 'torchscript' only" in capsys.readouterr().err
    assert main(base + ["--format", "torchscript", "--output", str(tmp_path / "m.ts")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["--cfg", str(cfg), "--load_ckpt", str(ckpt), "--format", "torchscript", "--output",
                 str(tmp_path / "m.ts"), "--calib", photos[0]]) == 2
    assert "TEST.QUANTIZE int8" in capsys.readouterr().err
