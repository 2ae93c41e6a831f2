"""Value checks run by ``assert_and_infer_cfg``: impossible settings fail before any work starts."""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Tuple

from yacs.config import CfgNode as _CN

from . import defaults as _defaults
from .errors import ConfigError
from .names import find_in_registry, parse_conv_body_name, strip_module_prefix as _strip_prefix

__all__ = ["ConfigError", "validate_cfg"]


def _one_of(choices) -> Tuple[Callable[[Any], bool], str]:
    """Membership check; dotted names also match without their module prefix ('ResNet50_conv4_body')."""
    if all(isinstance(c, str) for c in choices):
        norm = {_strip_prefix(c) for c in choices}
        return (lambda v: isinstance(v, str) and _strip_prefix(v) in norm,
                "one of " + ", ".join(repr(c) for c in sorted(choices)))
    return (lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def _conv_body_ok(value: Any) -> bool:
    """Built-in body names, or a name a user added to CONV_BODY_REGISTRY (whose module is then imported)."""
    if _one_of(_defaults.CONV_BODIES)[0](value):
        return True
    mod = sys.modules.get("maskrcnn.modeling.backbone.conv_body")
    # The same look-up build_conv_body does, so that every name it builds passes (module prefix optional).
    return mod is not None and find_in_registry(getattr(mod, "CONV_BODY_REGISTRY", {}), value) is not None


_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_UNIT = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_SIZES = (lambda v: all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v),
          "a list of positive integer sizes (may be empty)")
_RATIOS = (lambda v: all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in v),
           "a list of positive width factors (may be empty)")
_NOT_IMPLEMENTED_SIZE_DEP = (lambda v: v is False, "False (Detectron does not implement size-dependent test-time "
                             "scaling for boxes and masks either; it asserts the key off)")

# key -> (predicate, description of what is allowed)
_CHECKS = {
    "MODEL.CONV_BODY": (_conv_body_ok, _one_of(_defaults.CONV_BODIES)[1] + " or a name in CONV_BODY_REGISTRY"),
    "MODEL.NUM_CLASSES": (lambda v: v >= 2, ">= 2 (background plus at least one class)"),
    "MODEL.TYPE": _one_of(["generalized_rcnn"]),
    "KRCNN.ROI_KEYPOINTS_HEAD": _one_of(["keypoint_rcnn_heads.roi_pose_head_v1convX", "roi_pose_head_v1convX"]),
    "KRCNN.NUM_KEYPOINTS": _POS,
    "KRCNN.UP_SCALE": _POS,
    "KRCNN.NUM_STACKED_CONVS": _NONNEG,
    "KRCNN.CONV_HEAD_DIM": _POS,
    "MODEL.FASTER_RCNN": (lambda v: v is True, "True (Fast R-CNN on precomputed proposals is not supported; every "
                          "model runs its own RPN)"),
    "RPN.RPN_ON": (lambda v: v is True, "True (precomputed proposals are not supported; every model runs its own RPN)"),
    "MODEL.DEVICE": _one_of(["auto", "cpu", "cuda"]),
    "MODEL.BBOX_REG_WEIGHTS": (lambda v: len(v) == 4 and all(w > 0 for w in v), "four positive numbers"),
    "PIXEL_MEANS": (lambda v: len(v) == 3, "three numbers"),
    "PIXEL_STDS": (lambda v: len(v) == 3 and all(s > 0 for s in v), "three positive numbers"),
    "PIXEL_ORDER": _one_of(["BGR", "RGB"]),
    "PIXEL_SCALE": _POS,
    "OPS_BACKEND": _one_of(["native", "torchvision", "auto"]),
    "RESIZE_METHOD": _one_of(["torchvision", "detectron2"]),
    "SIZE_DIVISIBILITY": _NONNEG,
    "RESNETS.NUM_GROUPS": _POS,
    "RESNETS.WIDTH_PER_GROUP": _POS,
    "RESNETS.FREEZE_AT": (lambda v: 0 <= v <= 5, "in 0..5"),
    "RESNETS.RES5_DILATION": _one_of([1, 2]),
    "RESNETS.NORM": _one_of(["FrozenBN", "GN", "BN", "SyncBN"]),
    "RESNETS.TRANS_FUNC": _one_of(["bottleneck_transformation", "basic_transformation"]),
    "FPN.DIM": _POS,
    "FPN.ROI_CANONICAL_SCALE": _POS,
    "RPN.SIZES": (lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive sizes"),
    "RPN.STRIDE": _POS,
    "RPN.ASPECT_RATIOS": (lambda v: len(v) > 0 and all(r > 0 for r in v), "a non-empty list of positive ratios"),
    "FPN.RPN_ASPECT_RATIOS": (lambda v: len(v) > 0 and all(r > 0 for r in v), "a non-empty list of positive ratios"),
    "FPN.RPN_ANCHOR_START_SIZE": _POS,
    "RPN.CLS_ACTIVATION": _one_of(["sigmoid"]),
    "RPN.LOSS_NORMALIZATION": _one_of(["torchvision", "detectron"]),
    "FAST_RCNN.ROI_BOX_HEAD": _one_of(_defaults.BOX_HEADS),
    "FAST_RCNN.MLP_HEAD_DIM": _POS,
    "FAST_RCNN.NUM_STACKED_CONVS": _NONNEG,
    "FAST_RCNN.CONV_HEAD_DIM": _POS,
    "FAST_RCNN.ROI_XFORM_METHOD": _one_of(["RoIAlign", "RoIPoolF"]),
    "FAST_RCNN.ROI_XFORM_RESOLUTION": _POS,
    "FAST_RCNN.SMOOTH_L1_BETA": _NONNEG,
    "MRCNN.ROI_MASK_HEAD": _one_of(_defaults.MASK_HEADS),
    "MRCNN.RESOLUTION": _POS,
    "MRCNN.ROI_XFORM_METHOD": _one_of(["RoIAlign", "RoIPoolF"]),
    "MRCNN.ROI_XFORM_RESOLUTION": _POS,
    "MRCNN.DIM_REDUCED": _POS,
    "MRCNN.NUM_CONVS": _NONNEG,
    "MRCNN.DILATION": _POS,
    "MRCNN.THRESH_BINARIZE": _UNIT,
    "MRCNN.CONV_INIT": _one_of(["MSRAFill", "GaussianFill"]),
    "TRAIN.SCALES": (lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive sizes"),
    "TRAIN.MAX_SIZE": _POS,
    "TRAIN.IMS_PER_BATCH": _POS,
    "TRAIN.BATCH_SIZE_PER_IM": _POS,
    "TRAIN.ASPECT_RATIO_GROUP_FACTOR": _NONNEG,
    "TRAIN.FG_FRACTION": _UNIT,
    "TRAIN.FG_THRESH": _UNIT,
    "TRAIN.BG_THRESH_HI": _UNIT,
    "TRAIN.BG_THRESH_LO": _UNIT,
    "TRAIN.SNAPSHOT_ITERS": _POS,
    "TRAIN.RPN_PRE_NMS_TOP_N": _POS,
    "TRAIN.RPN_POST_NMS_TOP_N": _POS,
    "TRAIN.RPN_NMS_THRESH": _UNIT,
    "TRAIN.RPN_MIN_SIZE": _NONNEG,
    "TRAIN.RPN_POSITIVE_OVERLAP": _UNIT,
    "TRAIN.RPN_NEGATIVE_OVERLAP": _UNIT,
    "TRAIN.RPN_FG_FRACTION": _UNIT,
    "TRAIN.RPN_BATCH_SIZE_PER_IM": _POS,
    "TRAIN.CROWD_FILTER_THRESH": _UNIT,
    "TRAIN.AMP": _one_of(["", "fp16", "bf16"]),
    "TRAIN.LOG_PERIOD": _POS,
    "TEST.SCALE": _POS,
    "TEST.MAX_SIZE": _POS,
    "TEST.NMS": _UNIT,
    "TEST.SCORE_THRESH": _UNIT,
    "TEST.DETECTIONS_PER_IM": _POS,
    "TEST.MIN_BOX_SIZE": _NONNEG,
    "TEST.RPN_PRE_NMS_TOP_N": _POS,
    "TEST.RPN_POST_NMS_TOP_N": _POS,
    "TEST.RPN_NMS_THRESH": _UNIT,
    "TEST.RPN_MIN_SIZE": _NONNEG,
    "TEST.IMS_PER_BATCH": _POS,
    "TEST.AMP": _one_of(["", "fp16", "bf16"]),
    "TEST.MASK_PASTE_PADDING": _NONNEG,
    "TEST.EVAL_PERIOD": _NONNEG,
    "TEST.MASK_PASTE_METHOD": _one_of(["torchvision", "detectron2"]),
    "TEST.DETECTOR_POSTPROCESS": _one_of(["torchvision", "detectron2"]),
    "TEST.BBOX_AUG.SCORE_HEUR": _one_of(["ID", "AVG", "UNION"]),
    "TEST.BBOX_AUG.COORD_HEUR": _one_of(["ID", "AVG", "UNION"]),
    "TEST.BBOX_AUG.SCALES": _SIZES,
    "TEST.BBOX_AUG.MAX_SIZE": _POS,
    "TEST.BBOX_AUG.ASPECT_RATIOS": _RATIOS,
    "TEST.BBOX_AUG.SCALE_SIZE_DEP": _NOT_IMPLEMENTED_SIZE_DEP,
    "TEST.MASK_AUG.HEUR": _one_of(["SOFT_AVG", "SOFT_MAX", "LOGIT_AVG"]),
    "TEST.MASK_AUG.SCALES": _SIZES,
    "TEST.MASK_AUG.MAX_SIZE": _POS,
    "TEST.MASK_AUG.ASPECT_RATIOS": _RATIOS,
    "TEST.MASK_AUG.SCALE_SIZE_DEP": _NOT_IMPLEMENTED_SIZE_DEP,
    "TEST.KEYPOINT_OKS_SIGMAS": (lambda v: all(float(x) > 0 for x in v), "positive numbers, one per keypoint, or []"),
    "TEST.KPS_AUG.HEUR": _one_of(["HM_AVG", "HM_MAX"]),
    "TEST.KPS_AUG.SCALES": _SIZES,
    "TEST.KPS_AUG.MAX_SIZE": _POS,
    "TEST.KPS_AUG.ASPECT_RATIOS": _RATIOS,
    "TEST.BBOX_VOTE.VOTE_TH": _UNIT,
    "TEST.BBOX_VOTE.SCORING_METHOD": _one_of(["ID", "TEMP_AVG", "AVG", "IOU_AVG", "GENERALIZED_AVG", "QUASI_SUM"]),
    "TEST.BBOX_VOTE.SCORING_METHOD_BETA": _POS,
    "SOLVER.BASE_LR": _POS,
    "SOLVER.LR_POLICY": _one_of(["steps_with_decay", "cosine_decay", "constant"]),
    "SOLVER.OPTIMIZER": _one_of(["SGD", "AdamW"]),
    "SOLVER.ADAM_BETAS": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "SOLVER.BASE_LR_END": _NONNEG,
    "SOLVER.EMA_DECAY": (lambda v: 0.0 <= v < 1.0, "in [0, 1) (0 turns the EMA off)"),
    "SOLVER.GAMMA": _POS,
    "SOLVER.MAX_ITER": _POS,
    "SOLVER.MOMENTUM": _UNIT,
    "SOLVER.WEIGHT_DECAY": _NONNEG,
    "SOLVER.WEIGHT_DECAY_GN": _NONNEG,
    "SOLVER.WARM_UP_ITERS": _NONNEG,
    "SOLVER.WARM_UP_FACTOR": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "SOLVER.WARM_UP_METHOD": _one_of(["linear", "constant"]),
    "SOLVER.CLIP_GRAD_NORM": _NONNEG,
    "DATA_LOADER.NUM_THREADS": _NONNEG,
    "DATA_LOADER.MAX_IMAGE_SIDE": _NONNEG,
    "NUM_GPUS": _POS,
}


def _get(cfg: _CN, dotted: str) -> Any:
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def validate_cfg(cfg: _CN, source: str = "<config>") -> None:
    """Raise ConfigError on the first impossible value, naming key, value and source."""
    for key, (pred, allowed) in _CHECKS.items():
        value = _get(cfg, key)
        ok = False
        try:
            ok = bool(pred(value))
        except Exception:
            ok = False
        if not ok:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; it must be {allowed}")
    _relations(cfg, source)


def _relations(cfg: _CN, source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    f = cfg.FPN
    if not (f.ROI_MIN_LEVEL <= f.ROI_MAX_LEVEL):
        fail(f"FPN.ROI_MIN_LEVEL = {f.ROI_MIN_LEVEL} must be <= FPN.ROI_MAX_LEVEL = {f.ROI_MAX_LEVEL}")
    if not (f.RPN_MIN_LEVEL <= f.RPN_MAX_LEVEL):
        fail(f"FPN.RPN_MIN_LEVEL = {f.RPN_MIN_LEVEL} must be <= FPN.RPN_MAX_LEVEL = {f.RPN_MAX_LEVEL}")
    if f.FPN_ON:
        if f.ROI_MIN_LEVEL < 2 or f.ROI_MAX_LEVEL > 5:
            fail(f"FPN RoI levels must lie in 2..5 (res2..res5), got {f.ROI_MIN_LEVEL}..{f.ROI_MAX_LEVEL}")
        if f.RPN_MIN_LEVEL < 2 or f.RPN_MAX_LEVEL > 6:
            fail(f"FPN RPN levels must lie in 2..6, got {f.RPN_MIN_LEVEL}..{f.RPN_MAX_LEVEL}")
        if f.RPN_MIN_LEVEL > f.ROI_MIN_LEVEL:
            fail(f"FPN.RPN_MIN_LEVEL = {f.RPN_MIN_LEVEL} must be <= FPN.ROI_MIN_LEVEL = {f.ROI_MIN_LEVEL}")
    t = cfg.TRAIN
    if t.BG_THRESH_LO > t.BG_THRESH_HI:
        fail(f"TRAIN.BG_THRESH_LO = {t.BG_THRESH_LO} must be <= TRAIN.BG_THRESH_HI = {t.BG_THRESH_HI}")
    if t.RPN_NEGATIVE_OVERLAP > t.RPN_POSITIVE_OVERLAP:
        fail(f"TRAIN.RPN_NEGATIVE_OVERLAP = {t.RPN_NEGATIVE_OVERLAP} must be <= "
             f"TRAIN.RPN_POSITIVE_OVERLAP = {t.RPN_POSITIVE_OVERLAP}")
    if cfg.SOLVER.LR_POLICY == "cosine_decay" and cfg.SOLVER.BASE_LR_END > cfg.SOLVER.BASE_LR:
        fail(f"SOLVER.BASE_LR_END = {cfg.SOLVER.BASE_LR_END} must be <= SOLVER.BASE_LR = {cfg.SOLVER.BASE_LR}")
    steps: List[int] = list(cfg.SOLVER.STEPS)
    if any(s < 0 for s in steps) or steps != sorted(steps):
        fail(f"SOLVER.STEPS = {steps!r} must be non-negative and increasing")
    if cfg.TRAIN.AMP == "fp16" and cfg.MODEL.DEVICE == "cpu":
        fail("TRAIN.AMP = 'fp16' needs CUDA; use 'bf16' on the CPU")
    if cfg.TEST.AMP == "fp16" and cfg.MODEL.DEVICE == "cpu":
        fail("TEST.AMP = 'fp16' needs CUDA; use 'bf16' on the CPU")
    try:
        body = parse_conv_body_name(cfg.MODEL.CONV_BODY)
        is_c4 = body.kind == "resnet" and body.stage == 4
    except ConfigError:  # a custom body from CONV_BODY_REGISTRY: not known to end at res4
        is_c4 = False
    if cfg.FPN.FPN_ON and _strip_prefix(cfg.FAST_RCNN.ROI_BOX_HEAD) == "ResNet_roi_conv5_head":
        fail("FAST_RCNN.ROI_BOX_HEAD = ResNet.ResNet_roi_conv5_head needs a conv4 body, not an FPN body")
    if not is_c4 and cfg.MODEL.MASK_ON and "v0upshare" in cfg.MRCNN.ROI_MASK_HEAD:
        fail(f"MRCNN.ROI_MASK_HEAD = {cfg.MRCNN.ROI_MASK_HEAD} shares res5 with the C4 box head and needs a conv4 body "
             f"(MODEL.CONV_BODY = {cfg.MODEL.CONV_BODY})")
    if "v0upshare" in cfg.MRCNN.ROI_MASK_HEAD and cfg.MODEL.MASK_ON and \
            _strip_prefix(cfg.FAST_RCNN.ROI_BOX_HEAD) != "ResNet_roi_conv5_head":
        fail("MRCNN.ROI_MASK_HEAD ..._v0upshare needs FAST_RCNN.ROI_BOX_HEAD = ResNet.ResNet_roi_conv5_head")
    if cfg.MODEL.LEGACY_PLUS_ONE and not cfg.RPN.ROUND_ANCHORS:
        fail("RPN.ROUND_ANCHORS = False (detectron2's unrounded anchors) cannot be combined with "
             "MODEL.LEGACY_PLUS_ONE = True (Detectron's anchors, rounded their own way); set RPN.ROUND_ANCHORS True")
    k = cfg.KRCNN
    if cfg.MODEL.KEYPOINTS_ON and cfg.KRCNN.HEATMAP_SIZE != 2 * k.UP_SCALE * k.ROI_XFORM_RESOLUTION:
        fail(f"KRCNN.HEATMAP_SIZE = {cfg.KRCNN.HEATMAP_SIZE} must be 2 * KRCNN.UP_SCALE * KRCNN.ROI_XFORM_RESOLUTION = "
             f"{2 * k.UP_SCALE * k.ROI_XFORM_RESOLUTION} (a stride-2 deconvolution, then the upsampling)")
    _test_time_augmentation(cfg, fail)
    if cfg.MODEL.CASCADE_ON:
        _cascade(cfg, fail)
    if len(cfg.PIXEL_MEANS) != len(cfg.PIXEL_STDS):
        fail("PIXEL_MEANS and PIXEL_STDS must have the same length")


def _test_time_augmentation(cfg: _CN, fail: Callable[[str], None]) -> None:
    """Detectron's asserts of ``im_detect_bbox_aug`` (UNION scores iff UNION boxes), and what needs which head.

    The third Detectron assert (UNION when the RPN computes the proposals) depends on the call, not on the config:
    ``maskrcnn/engine/tta.py`` checks it where the proposals are known."""
    box, mask = cfg.TEST.BBOX_AUG, cfg.TEST.MASK_AUG
    if box.ENABLED and (box.SCORE_HEUR == "UNION") != (box.COORD_HEUR == "UNION"):
        fail(f"TEST.BBOX_AUG.SCORE_HEUR = {box.SCORE_HEUR!r} and TEST.BBOX_AUG.COORD_HEUR = {box.COORD_HEUR!r}: "
             f"the union of the augmentations' RoIs merges scores and boxes together; set both to 'UNION' or "
             f"neither (Detectron's rule)")
    if box.ENABLED and cfg.MODEL.RPN_ONLY:
        fail("TEST.BBOX_AUG.ENABLED needs the box head; MODEL.RPN_ONLY models have none")
    if mask.ENABLED and not cfg.MODEL.MASK_ON:
        fail("TEST.MASK_AUG.ENABLED needs the mask head: set MODEL.MASK_ON True or TEST.MASK_AUG.ENABLED False")
    kps = cfg.TEST.KPS_AUG
    if kps.ENABLED and not cfg.MODEL.KEYPOINTS_ON:
        fail("TEST.KPS_AUG.ENABLED needs the keypoint head: set MODEL.KEYPOINTS_ON True or TEST.KPS_AUG.ENABLED False")
    flips = kps.H_FLIP or (kps.SCALE_H_FLIP and kps.SCALES) or (kps.ASPECT_RATIO_H_FLIP and kps.ASPECT_RATIOS)
    names = list(cfg.KRCNN.KEYPOINT_NAMES)
    if kps.ENABLED and flips and len(names) != cfg.KRCNN.NUM_KEYPOINTS:
        fail(f"TEST.KPS_AUG flips the image, which swaps left and right keypoints by their names, but "
             f"KRCNN.KEYPOINT_NAMES has {len(names)} names for KRCNN.NUM_KEYPOINTS = {cfg.KRCNN.NUM_KEYPOINTS}; "
             f"set KRCNN.KEYPOINT_NAMES to your dataset's keypoint names (its COCO json's categories[].keypoints)")


def _cascade(cfg: _CN, fail: Callable[[str], None]) -> None:
    """What detectron2's CascadeROIHeads asserts, with the keys that fix it."""
    c = cfg.CASCADE_RCNN
    n = len(c.IOUS)
    if n < 1 or len(c.BBOX_REG_WEIGHTS) != n or len(c.STAGE_WEIGHTS) != n:
        fail(f"CASCADE_RCNN.IOUS ({n}), BBOX_REG_WEIGHTS ({len(c.BBOX_REG_WEIGHTS)}) and STAGE_WEIGHTS "
             f"({len(c.STAGE_WEIGHTS)}) need one entry per stage (at least one)")
    if not all(0.0 < float(v) < 1.0 for v in c.IOUS):
        fail(f"CASCADE_RCNN.IOUS = {list(c.IOUS)} must lie in (0, 1)")
    if not all(len(w) == 4 and all(float(x) > 0 for x in w) for w in c.BBOX_REG_WEIGHTS):
        fail(f"CASCADE_RCNN.BBOX_REG_WEIGHTS = {list(c.BBOX_REG_WEIGHTS)}: each stage needs 4 positive weights")
    if not all(float(w) >= 0 for w in c.STAGE_WEIGHTS):
        fail(f"CASCADE_RCNN.STAGE_WEIGHTS = {list(c.STAGE_WEIGHTS)} must be >= 0")
    if abs(float(c.IOUS[0]) - float(cfg.TRAIN.FG_THRESH)) > 1e-9:
        fail(f"CASCADE_RCNN.IOUS[0] = {c.IOUS[0]} must equal TRAIN.FG_THRESH = {cfg.TRAIN.FG_THRESH} (stage 0 "
             f"samples the RPN's proposals with the plain heads' matcher)")
    if not cfg.MODEL.CLS_AGNOSTIC_BBOX_REG:
        fail("MODEL.CASCADE_ON needs MODEL.CLS_AGNOSTIC_BBOX_REG True: each stage's one box is the next stage's RoI")
    if _strip_prefix(cfg.FAST_RCNN.ROI_BOX_HEAD) == "ResNet_roi_conv5_head":
        fail("MODEL.CASCADE_ON runs FPN box heads (fast_rcnn_heads.roi_2mlp_head, roi_Xconv1fc_head...), not "
             "FAST_RCNN.ROI_BOX_HEAD = ResNet.ResNet_roi_conv5_head")
    if cfg.MODEL.RPN_ONLY:
        fail("MODEL.CASCADE_ON needs RoI heads; MODEL.RPN_ONLY models have none")
