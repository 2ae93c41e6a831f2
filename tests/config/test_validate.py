"""maskrcnn.config.validate on its own: every checked key rejects a bad value with a message naming key, value
and source; every relation between keys is enforced; good configs pass untouched."""
import re

import pytest

from maskrcnn.config import ConfigError, get_cfg
from maskrcnn.config import validate as validate_mod
from maskrcnn.config.validate import validate_cfg

FPN_OPTS = ["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FPN.FPN_ON", True,
            "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head",
            "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"]


def _cfg(*opts):
    c = get_cfg()
    c.merge_from_list(list(opts))
    return c


def _get(cfg, key):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def test_defaults_and_an_fpn_config_pass_and_are_not_changed():
    for c in (get_cfg(), _cfg(*FPN_OPTS)):
        before = c.dump()
        validate_cfg(c)
        assert c.dump() == before


# One bad value per class of check; each from a config file, so the message must name the file too.
@pytest.mark.parametrize("key,value,allowed", [
    ("MODEL.CONV_BODY", "ResNet.ResNet51_conv4_body", "or a name in CONV_BODY_REGISTRY"),
    ("MODEL.NUM_CLASSES", 1, ">= 2 (background plus at least one class)"),
    ("KRCNN.NUM_KEYPOINTS", 0, "> 0"),
    ("MODEL.FASTER_RCNN", False, "True (Fast R-CNN on precomputed proposals is not supported"),
    ("RPN.RPN_ON", False, "True (precomputed proposals are not supported"),
    ("RPN.LOSS_NORMALIZATION", "caffe2", "one of 'detectron', 'torchvision'"),
    ("FAST_RCNN.SMOOTH_L1_BETA", -1.0, ">= 0"),
    ("MODEL.DEVICE", "tpu", "one of 'auto', 'cpu', 'cuda'"),
    ("MODEL.BBOX_REG_WEIGHTS", [10.0, 10.0, 5.0], "four positive numbers"),
    ("MODEL.BBOX_REG_WEIGHTS", [10.0, 10.0, 5.0, 0.0], "four positive numbers"),
    ("PIXEL_STDS", [1.0, 0.0, 1.0], "three positive numbers"),
    ("PIXEL_ORDER", "GRB", "one of 'BGR', 'RGB'"),
    ("RESNETS.FREEZE_AT", 6, "in 0..5"),
    ("RESNETS.RES5_DILATION", 3, "one of 1, 2"),
    ("RESNETS.NORM", "LN", "one of 'BN', 'FrozenBN', 'GN'"),
    ("RPN.SIZES", [], "a non-empty list of positive sizes"),
    ("RPN.ASPECT_RATIOS", [0.5, -1.0], "a non-empty list of positive ratios"),
    ("FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_3mlp_head", "'ResNet.ResNet_roi_conv5_head'"),
    ("FAST_RCNN.ROI_XFORM_METHOD", "RoIWarp", "one of 'RoIAlign', 'RoIPoolF'"),
    ("MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v2up", "mask_rcnn_fcn_head_v1up4convs"),
    ("MRCNN.NUM_CONVS", -1, ">= 0"),
    ("MRCNN.THRESH_BINARIZE", 1.5, "in [0, 1]"),
    ("TRAIN.SCALES", [800, 0], "a non-empty list of positive sizes"),
    ("TRAIN.FG_FRACTION", -0.1, "in [0, 1]"),
    ("TRAIN.AMP", "fp8", "one of '', 'bf16', 'fp16'"),
    ("TEST.DETECTIONS_PER_IM", 0, "> 0"),
    ("SOLVER.BASE_LR", -0.1, "> 0"),
    ("SOLVER.WARM_UP_FACTOR", 0.0, "in (0, 1]"),
    ("SOLVER.LR_POLICY", "cosine", "one of 'constant', 'cosine_decay', 'steps_with_decay'"),
    ("DATA_LOADER.NUM_THREADS", -2, ">= 0"),
    ("NUM_GPUS", 0, "> 0"),
])
def test_bad_value_names_key_value_allowed_and_source(key, value, allowed):
    c = _cfg(key, value)
    with pytest.raises(ConfigError) as e:
        validate_cfg(c, source="configs/my.yaml")
    msg = str(e.value)
    assert msg.startswith(f"configs/my.yaml: {key} = {value!r} is not allowed; it must be "), msg
    assert allowed in msg


def test_module_prefix_is_optional_in_names():
    validate_cfg(_cfg("MODEL.CONV_BODY", "ResNet101_conv4_body", "FAST_RCNN.ROI_BOX_HEAD", "ResNet_roi_conv5_head",
                      "MRCNN.ROI_MASK_HEAD", "mask_rcnn_fcn_head_v0upshare"))


_CANDIDATES = [-1, 0, -0.5, 1.5, 6, 3, 1, 2.5, [], [0], [1.0, 2.0], [1, 0], "not-a-choice", "", True, False]


def _bad_value_for(key, pred):
    """A value of the default's type that the check rejects (what a YAML file could contain)."""
    default = _get(get_cfg(), key)
    for v in _CANDIDATES:
        if type(v) is type(default) or (isinstance(default, float) and type(v) is int) or \
                (isinstance(default, list) and isinstance(v, list)):
            try:
                if not pred(v):
                    return v
            except Exception:
                return v
    raise AssertionError(f"no candidate bad value for {key} (default {default!r})")


@pytest.mark.parametrize("key", sorted(validate_mod._CHECKS))
def test_every_checked_key_rejects_a_bad_value_by_name(key):
    pred, _ = validate_mod._CHECKS[key]
    assert pred(_get(get_cfg(), key))  # the default itself is allowed
    bad = _bad_value_for(key, pred)
    c = get_cfg()
    parent, leaf = (c, key) if "." not in key else (_get(c, key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])
    parent[leaf] = bad
    with pytest.raises(ConfigError, match=re.escape(f"{key} = {bad!r} is not allowed")):
        validate_cfg(c)


# Relations between keys: each message names the keys involved.
@pytest.mark.parametrize("opts,message", [
    (FPN_OPTS + ["FPN.ROI_MIN_LEVEL", 5, "FPN.ROI_MAX_LEVEL", 3],
     "FPN.ROI_MIN_LEVEL = 5 must be <= FPN.ROI_MAX_LEVEL = 3"),
    (["FPN.RPN_MIN_LEVEL", 6, "FPN.RPN_MAX_LEVEL", 4],  # checked with or without FPN
     "FPN.RPN_MIN_LEVEL = 6 must be <= FPN.RPN_MAX_LEVEL = 4"),
    (FPN_OPTS + ["FPN.ROI_MIN_LEVEL", 1], "FPN RoI levels must lie in 2..5 (res2..res5), got 1..5"),
    (FPN_OPTS + ["FPN.ROI_MAX_LEVEL", 6], "FPN RoI levels must lie in 2..5 (res2..res5), got 2..6"),
    (FPN_OPTS + ["FPN.RPN_MAX_LEVEL", 7], "FPN RPN levels must lie in 2..6, got 2..7"),
    (FPN_OPTS + ["FPN.RPN_MIN_LEVEL", 3], "FPN.RPN_MIN_LEVEL = 3 must be <= FPN.ROI_MIN_LEVEL = 2"),
    (["TRAIN.BG_THRESH_LO", 0.6, "TRAIN.BG_THRESH_HI", 0.5],
     "TRAIN.BG_THRESH_LO = 0.6 must be <= TRAIN.BG_THRESH_HI = 0.5"),
    (["TRAIN.RPN_NEGATIVE_OVERLAP", 0.8, "TRAIN.RPN_POSITIVE_OVERLAP", 0.7],
     "TRAIN.RPN_NEGATIVE_OVERLAP = 0.8 must be <= TRAIN.RPN_POSITIVE_OVERLAP = 0.7"),
    (["SOLVER.STEPS", [0, 100, 50]], "SOLVER.STEPS = [0, 100, 50] must be non-negative and increasing"),
    (["SOLVER.STEPS", [-5, 10]], "SOLVER.STEPS = [-5, 10] must be non-negative and increasing"),
    (["TRAIN.AMP", "fp16", "MODEL.DEVICE", "cpu"], "TRAIN.AMP = 'fp16' needs CUDA; use 'bf16' on the CPU"),
    (["TEST.AMP", "fp16", "MODEL.DEVICE", "cpu"], "TEST.AMP = 'fp16' needs CUDA; use 'bf16' on the CPU"),
    (FPN_OPTS + ["FAST_RCNN.ROI_BOX_HEAD", "ResNet.ResNet_roi_conv5_head"],
     "FAST_RCNN.ROI_BOX_HEAD = ResNet.ResNet_roi_conv5_head needs a conv4 body, not an FPN body"),
    (["MODEL.CONV_BODY", "ResNet.ResNet50_conv5_body"],
     "MRCNN.ROI_MASK_HEAD = mask_rcnn_heads.mask_rcnn_fcn_head_v0upshare shares res5 with the C4 box head and needs "
     "a conv4 body (MODEL.CONV_BODY = ResNet.ResNet50_conv5_body)"),
    (["FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head"],
     "MRCNN.ROI_MASK_HEAD ..._v0upshare needs FAST_RCNN.ROI_BOX_HEAD = ResNet.ResNet_roi_conv5_head"),
    (["PIXEL_MEANS", [1.0, 2.0, 3.0], "PIXEL_STDS", [1.0, 2.0, 3.0, 4.0]], "PIXEL_STDS = [1.0, 2.0, 3.0, 4.0]"),
])
def test_impossible_combinations_name_the_keys(opts, message):
    with pytest.raises(ConfigError) as e:
        validate_cfg(_cfg(*opts), source="run.yaml")
    assert str(e.value).startswith("run.yaml: ") and message in str(e.value), str(e.value)


def test_relations_that_only_matter_in_context_are_not_enforced_outside_it():
    validate_cfg(_cfg("FPN.ROI_MIN_LEVEL", 1))  # a C4 model has no pyramid levels to check
    validate_cfg(_cfg("TRAIN.AMP", "fp16", "MODEL.DEVICE", "auto"))  # may resolve to CUDA
    validate_cfg(_cfg("MODEL.MASK_ON", False, "MODEL.CONV_BODY", "ResNet.ResNet50_conv5_body"))  # no mask head


def test_the_source_defaults_to_a_placeholder():
    c = get_cfg()
    c.TEST.RPN_PRE_NMS_TOP_N = 0
    c.TEST.RPN_POST_NMS_TOP_N = 100
    with pytest.raises(ConfigError, match=r"<config>: TEST\.RPN_PRE_NMS_TOP_N = 0 is not allowed"):
        validate_cfg(c)
