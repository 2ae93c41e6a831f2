"""GroupNorm model-zoo weights (Detectron's and detectron2's GN Mask R-CNN R-50-FPN) into our GN model.

The reference names are written here from the projects' sources, independently of the converters:
Detectron's ``ConvGN`` blobs (``<prefix>_w`` with no bias, ``<prefix>_gn_s`` / ``_gn_b``) in ``ResNet.py`` (GN
stem ``conv1``, blocks ``res{s}_{b}_branch{2a,2b,2c,1}``), ``FPN.py`` (``fpn_inner_res5_2_sum``,
``fpn_inner_res{s}_{last}_sum_lateral``, ``fpn_res{s}_{last}_sum``), ``fast_rcnn_heads.roi_Xconv1fc_gn_head``
(``head_conv{i}``, then ``fc6``) and ``mask_rcnn_heads.mask_rcnn_fcn_head_v1upXconvs_gn`` (``_mask_fcn{i}``, no
brackets); detectron2's ``Conv2d(norm=GN)`` modules (``...conv1.norm.weight``, ``backbone.fpn_lateral2.norm.*``,
``roi_heads.box_head.conv{i}.norm.*`` then ``fc1``, ``roi_heads.mask_head.mask_fcn{i}.norm.*``).
"""
import numpy as np
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.weights.detectron import canonical_to_detectron
from maskrcnn.utils.weights.detectron_pytorch import detectron_pytorch_to_canonical
from maskrcnn.utils.weights.formats import convert_to_ours, detect_format, ours_to_canonical

R50 = [(2, 3), (3, 4), (4, 6), (5, 3)]  # stage, blocks
NUM_CLASSES = 3
BODY = "Conv_Body.conv_body."


def gn_cfg():
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "MODEL.NUM_CLASSES", NUM_CLASSES,
        "RESNETS.NORM", "GN", "RESNETS.FREEZE_AT", 0, "FPN.USE_GN", True, "FPN.DIM", 64,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_Xconv1fc_gn_head", "FAST_RCNN.CONV_HEAD_DIM", 32,
        "FAST_RCNN.MLP_HEAD_DIM", 64, "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
        "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs_gn", "MRCNN.DIM_REDUCED", 32,
        "MRCNN.RESOLUTION", 28, "MRCNN.DILATION", 1,
    ])
    return cfg


@pytest.fixture(scope="module")
def gn_model():
    torch.manual_seed(0)
    cfg = gn_cfg()
    return cfg, Generalized_RCNN(cfg).state_dict()


def detectron_gn_names():
    """Detectron blob name -> where it must land in our model (GN R-50-FPN Mask R-CNN)."""
    m = {"conv1_w": BODY + "res1.conv1.weight", "conv1_gn_s": BODY + "res1.bn1.weight",
         "conv1_gn_b": BODY + "res1.bn1.bias"}
    branches = [("2a", "conv1", "bn1"), ("2b", "conv2", "bn2"), ("2c", "conv3", "bn3")]
    for s, n in R50:
        for b in range(n):
            for br, conv, bn in branches + ([("1", "downsample.0", "downsample.1")] if b == 0 else []):
                pre, ours = f"res{s}_{b}_branch{br}", f"{BODY}res{s}.{b}"
                m[pre + "_w"] = f"{ours}.{conv}.weight"
                m[pre + "_gn_s"] = f"{ours}.{bn}.weight"
                m[pre + "_gn_b"] = f"{ours}.{bn}.bias"
    for s, n in R50:
        last = f"res{s}_{n - 1}_sum"
        lateral = f"fpn_inner_{last}" + ("" if s == 5 else "_lateral")
        for det, ours in ((lateral, f"Conv_Body.fpn.lateral_convs.{s - 2}"),
                          (f"fpn_{last}", f"Conv_Body.fpn.output_convs.{s - 2}")):
            m[det + "_w"] = ours + ".0.weight"
            m[det + "_gn_s"] = ours + ".1.weight"
            m[det + "_gn_b"] = ours + ".1.bias"
    for det, ours in (("conv_rpn_fpn2", "RPN.head.RPN_conv"), ("rpn_cls_logits_fpn2", "RPN.head.RPN_cls_score"),
                      ("rpn_bbox_pred_fpn2", "RPN.head.RPN_bbox_pred"), ("fc6", "Box_Head.fc6"),
                      ("cls_score", "Box_Outs.cls_score"), ("bbox_pred", "Box_Outs.bbox_pred"),
                      ("conv5_mask", "Mask_Head.conv5_mask"), ("mask_fcn_logits", "Mask_Outs.mask_fcn_logits")):
        m[det + "_w"], m[det + "_b"] = ours + ".weight", ours + ".bias"
    for i in range(1, 5):
        m[f"head_conv{i}_w"] = f"Box_Head.head_conv{i}.weight"
        m[f"head_conv{i}_gn_s"] = f"Box_Head.head_conv{i}_gn.weight"
        m[f"head_conv{i}_gn_b"] = f"Box_Head.head_conv{i}_gn.bias"
        m[f"_mask_fcn{i}_w"] = f"Mask_Head.mask_fcn{i}.weight"
        m[f"_mask_fcn{i}_gn_s"] = f"Mask_Head.mask_fcn{i}_gn.weight"
        m[f"_mask_fcn{i}_gn_b"] = f"Mask_Head.mask_fcn{i}_gn.bias"
    return m


def detectron2_gn_names():
    """detectron2 name -> our name for the layers whose layout is the same in both (everything but the class-
    dependent predictors, which the converter re-orders)."""
    d2b = "backbone.bottom_up."
    m = {d2b + "stem.conv1.weight": BODY + "res1.conv1.weight",
         d2b + "stem.conv1.norm.weight": BODY + "res1.bn1.weight",
         d2b + "stem.conv1.norm.bias": BODY + "res1.bn1.bias"}
    for s, n in R50:
        for b in range(n):
            pairs = [(f"conv{i}", f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            pairs += [("shortcut", "downsample.0", "downsample.1")] if b == 0 else []
            for d2, conv, bn in pairs:
                pre, ours = f"{d2b}res{s}.{b}.{d2}", f"{BODY}res{s}.{b}"
                m[pre + ".weight"] = f"{ours}.{conv}.weight"
                m[pre + ".norm.weight"] = f"{ours}.{bn}.weight"
                m[pre + ".norm.bias"] = f"{ours}.{bn}.bias"
        for kind, ours in (("lateral", "lateral_convs"), ("output", "output_convs")):
            m[f"backbone.fpn_{kind}{s}.weight"] = f"Conv_Body.fpn.{ours}.{s - 2}.0.weight"
            m[f"backbone.fpn_{kind}{s}.norm.weight"] = f"Conv_Body.fpn.{ours}.{s - 2}.1.weight"
            m[f"backbone.fpn_{kind}{s}.norm.bias"] = f"Conv_Body.fpn.{ours}.{s - 2}.1.bias"
    for d2, ours in (("proposal_generator.rpn_head.conv", "RPN.head.RPN_conv"),
                     ("proposal_generator.rpn_head.objectness_logits", "RPN.head.RPN_cls_score"),
                     ("proposal_generator.rpn_head.anchor_deltas", "RPN.head.RPN_bbox_pred"),
                     ("roi_heads.box_head.fc1", "Box_Head.fc6"), ("roi_heads.mask_head.deconv", "Mask_Head.conv5_mask")):
        m[d2 + ".weight"], m[d2 + ".bias"] = ours + ".weight", ours + ".bias"
    for i in range(1, 5):
        for d2, ours in ((f"roi_heads.box_head.conv{i}", f"Box_Head.head_conv{i}"),
                         (f"roi_heads.mask_head.mask_fcn{i}", f"Mask_Head.mask_fcn{i}")):
            m[d2 + ".weight"] = ours + ".weight"
            m[d2 + ".norm.weight"] = ours + "_gn.weight"
            m[d2 + ".norm.bias"] = ours + "_gn.bias"
    return m


def _random_like(shape, rng):
    return rng.standard_normal(tuple(shape), dtype=np.float32)


def test_detectron_gn_pkl_lands_exactly_and_loads_strictly(gn_model):
    cfg, sd = gn_model
    names = detectron_gn_names()
    for real in ("res2_0_branch2a_gn_s", "res2_0_branch1_gn_b", "fpn_inner_res5_2_sum_gn_s",
                 "fpn_inner_res4_5_sum_lateral_gn_s", "fpn_res2_2_sum_gn_b", "head_conv1_gn_s", "_mask_fcn1_gn_s"):
        assert real in names
    assert set(names.values()) == set(sd), "the reference names must cover the whole GN model"
    rng = np.random.default_rng(0)
    blobs = {det: _random_like(sd[ours].shape, rng) for det, ours in names.items()}
    blobs["head_conv1_w_momentum"] = np.zeros(1, np.float32)  # SGD state: dropped
    assert detect_format({"blobs": blobs}) == "detectron"
    ours, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
    for det, our in names.items():
        assert torch.equal(ours[our], torch.from_numpy(blobs[det])), (det, our)
    model = Generalized_RCNN(cfg)
    model.load_state_dict(ours, strict=True)
    # Back to Detectron's names: the GN blob names come out again.
    back = canonical_to_detectron(ours_to_canonical(ours))
    assert set(back) == set(names)
    assert all(np.array_equal(back[k], blobs[k]) for k in names)


def test_detectron_fork_names_with_brackets_also_load(gn_model):
    cfg, sd = gn_model
    names = {(k.replace("_mask_fcn", "_[mask]_fcn") if k.startswith("_mask_fcn") else k): v
             for k, v in detectron_gn_names().items()}
    rng = np.random.default_rng(1)
    blobs = {det: _random_like(sd[ours].shape, rng) for det, ours in names.items()}
    ours, _ = convert_to_ours({"blobs": blobs}, "detectron", cfg)
    assert torch.equal(ours["Mask_Head.mask_fcn2_gn.bias"], torch.from_numpy(blobs["_[mask]_fcn2_gn_b"]))


def test_detectron2_gn_checkpoint_lands_exactly_and_loads_strictly(gn_model):
    cfg, sd = gn_model
    names = detectron2_gn_names()
    rng = np.random.default_rng(2)
    state = {d2: torch.from_numpy(_random_like(sd[ours].shape, rng)) for d2, ours in names.items()}
    k = NUM_CLASSES - 1  # detectron2: K+1 scores with the background last, 4K deltas, K masks
    cls_w = torch.randn(k + 1, sd["Box_Outs.cls_score.weight"].shape[1])
    state.update({
        "roi_heads.box_predictor.cls_score.weight": cls_w, "roi_heads.box_predictor.cls_score.bias": torch.randn(k + 1),
        "roi_heads.box_predictor.bbox_pred.weight": torch.randn(4 * k, cls_w.shape[1]),
        "roi_heads.box_predictor.bbox_pred.bias": torch.randn(4 * k),
        "roi_heads.mask_head.predictor.weight": torch.randn(k, sd["Mask_Outs.mask_fcn_logits.weight"].shape[1], 1, 1),
        "roi_heads.mask_head.predictor.bias": torch.randn(k),
    })
    obj = {"model": state, "__author__": "Detectron2 Model Zoo"}
    assert detect_format(obj) == "detectron2"
    ours, _ = convert_to_ours(obj, "detectron2", cfg)
    for d2, our in names.items():
        assert torch.equal(ours[our], state[d2]), (d2, our)
    assert torch.equal(ours["Box_Outs.cls_score.weight"][0], cls_w[-1])  # background row first
    Generalized_RCNN(cfg).load_state_dict(ours, strict=True)


def test_detectron_pytorch_gn_heads_convert_like_the_blobs(gn_model):
    # Detectron.pytorch's detectron_weight_mapping: Box_Head.convs.{3i} / {3i+1} (conv, GroupNorm), Box_Head.fc,
    # Mask_Head.conv_fcn.{3i} / {3i+1} (v1upXconvs_gn), Mask_Head.upconv.
    rng = np.random.default_rng(3)
    sd = {}
    for i in range(4):
        for head in ("Box_Head.convs", "Mask_Head.conv_fcn"):
            sd[f"{head}.{3 * i}.weight"] = torch.from_numpy(_random_like((32, 32, 3, 3), rng))
            sd[f"{head}.{3 * i + 1}.weight"] = torch.from_numpy(_random_like((32,), rng))
            sd[f"{head}.{3 * i + 1}.bias"] = torch.from_numpy(_random_like((32,), rng))
    sd["Box_Head.fc.weight"] = torch.from_numpy(_random_like((64, 32 * 49), rng))
    sd["Box_Head.fc.bias"] = torch.from_numpy(_random_like((64,), rng))
    canonical, _ = detectron_pytorch_to_canonical(sd)
    assert torch.equal(canonical["box.conv3.weight"], sd["Box_Head.convs.6.weight"])
    assert torch.equal(canonical["box.conv4.norm.bias"], sd["Box_Head.convs.10.bias"])
    assert torch.equal(canonical["mask.fcn2.norm.weight"], sd["Mask_Head.conv_fcn.4.weight"])
    assert torch.equal(canonical["box.fc6.weight"], sd["Box_Head.fc.weight"])


def test_the_gn_baseline_config_has_exactly_detectrons_gn_layout():
    import os
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(repo, "configs", "baselines", "e2e_mask_rcnn_R-50-FPN_2x_gn.yaml"))
    sd = Generalized_RCNN(cfg).state_dict()
    assert set(detectron_gn_names().values()) == set(sd)
    assert sd["Box_Head.fc6.weight"].shape == (1024, 256 * 7 * 7) and sd["Mask_Head.mask_fcn4.weight"].shape[0] == 256
