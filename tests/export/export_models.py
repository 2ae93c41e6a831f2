"""Models and photos shared by the export tests.

Weights are seeded random, with the score layers scaled up (RPN objectness x4, box classifier x8, mask logits x8)
so that scores are well separated and masks far from 0.5: with plain random weights near-tied scores reorder
under any change of float summation order, and a comparison of exported and eager detections would prove
nothing. The scores of the eager detections are checked to be separated (:func:`assert_separated`).
"""
import os

import cv2
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PHOTOS = ("FudanPed00001", "PennPed00002")  # 536x559 and 378x745: two aspect ratios, two resized sizes


def _scaled(model):
    with torch.no_grad():
        model.RPN.head.RPN_cls_score.weight.mul_(4.0)
        model.Box_Outs.cls_score.weight.mul_(8.0)
        model.Mask_Outs.mask_fcn_logits.weight.mul_(8.0)
    return model.eval()


def scaled(model):
    """``model`` with the score layers scaled (see the module docstring), in eval mode."""
    return _scaled(model)


def fpn_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml"))
    cfg.merge_from_list(["TEST.SCALE", 320, "TEST.MAX_SIZE", 480, "TEST.SCORE_THRESH", 0.05,
                         "TEST.DETECTIONS_PER_IM", 100])
    return cfg


def c4_cfg():
    cfg = get_cfg()
    cfg.merge_from_list([
        # GroupNorm: with random weights, BatchNorm's unit statistics saturate the res5 head (equal scores).
        "MODEL.CONV_BODY", "ResNet.ResNet18_conv4_body", "MODEL.NUM_CLASSES", 4, "RESNETS.NORM", "GN",
        "RESNETS.FREEZE_AT", 0, "TEST.SCALE", 256, "TEST.MAX_SIZE", 400, "TEST.SCORE_THRESH", 0.05,
        "TEST.RPN_PRE_NMS_TOP_N", 1000, "TEST.RPN_POST_NMS_TOP_N", 100, "TEST.DETECTIONS_PER_IM", 50,
    ])
    return cfg


def assert_separated(ref, min_gap=1e-5):
    """The eager detections are not empty and no two of the first 20 consecutive scores are closer than
    ``min_gap`` (10x the ~1e-6 differences float reordering causes), so that their order is meaningful."""
    scores = ref["scores"][:20]
    assert scores.numel() > 0, "the test model detects nothing on this photo"
    gaps = (scores[:-1] - scores[1:]).abs()
    assert gaps.numel() == 0 or float(gaps.min()) > min_gap, f"near-tied eager scores: {scores.tolist()}"


def report(fmt, arch, photo, diff):
    """Print the figures of one comparison (the test log is where the closing note reads them)."""
    print(f"[export equivalence] {fmt:12s} {arch:3s} {photo}: {diff}")
