"""RPN.LOSS_NORMALIZATION: torchvision's and Detectron's loss divisors against hand-computed values, on a batch where
both images have fewer labelled anchors than RPN_BATCH_SIZE_PER_IM (the only case where the rules differ)."""
import math

import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.rpn.loss import rpn_losses
from maskrcnn.modeling.rpn.rpn import RPN
from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler

BATCH_PER_IMAGE = 4
# Three anchors, no two overlapping. Image 0: gt = A0, so A0 positive and A1, A2 negative (3 sampled).
# Image 1: gt = A1 and a crowd region over A2, so A1 positive, A0 negative, A2 ignored (2 sampled).
ANCHORS = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
GT = [ANCHORS[0:1].clone(), ANCHORS[1:2].clone()]
CROWD = [None, torch.tensor([[38.0, 38, 52, 52]])]
LOGITS = [[2.0, -1.0, 0.5], [1.0, 3.0, -2.0]]
DELTAS = [[[0.05, -0.3, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7], [0.7, 0.7, 0.7, 0.7]],
          [[0.7, 0.7, 0.7, 0.7], [0.2, 0.0, 0.0, -0.1], [0.7, 0.7, 0.7, 0.7]]]


def _softplus(z):
    return math.log1p(math.exp(z))


def _smooth_l1(d, beta=1.0 / 9):
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


# Hand-computed sums: BCE of label 1 is softplus(-x), of label 0 softplus(x); the targets of positives are 0 (each
# positive anchor equals its ground truth), so the box loss is the smooth L1 of the predicted deltas.
CLS_SUM = _softplus(-2.0) + _softplus(-1.0) + _softplus(0.5) + _softplus(1.0) + _softplus(-3.0)
BOX_IMAGE0 = sum(_smooth_l1(d) for d in DELTAS[0][0])
BOX_IMAGE1 = sum(_smooth_l1(d) for d in DELTAS[1][1])
SAMPLED = (3, 2)
EXPECTED = {
    # torchvision: both sums over all sampled anchors of the batch.
    ("torchvision", 1): (CLS_SUM / 5, (BOX_IMAGE0 + BOX_IMAGE1) / 5),
    ("torchvision", 2): (CLS_SUM / 5, (BOX_IMAGE0 + BOX_IMAGE1) / 5),
    # Detectron: box per image over that image's sample, averaged over images; objectness over B x images (FPN,
    # multi-level) or averaged over the sample (single level).
    ("detectron", 1): (CLS_SUM / 5, (BOX_IMAGE0 / 3 + BOX_IMAGE1 / 2) / 2),
    ("detectron", 2): (CLS_SUM / (BATCH_PER_IMAGE * 2), (BOX_IMAGE0 / 3 + BOX_IMAGE1 / 2) / 2),
}


def _inputs(levels):
    """Per-level ``(2, 1, 1, W)`` logits, ``(2, 4, 1, W)`` deltas and ``(W, 4)`` anchors: one level of three
    locations, or two levels holding A0, A1 and A2."""
    logits = torch.tensor(LOGITS).reshape(2, 1, 1, 3)
    deltas = torch.tensor(DELTAS).permute(0, 2, 1).reshape(2, 4, 1, 3)
    splits = [(0, 3)] if levels == 1 else [(0, 2), (2, 3)]
    objectness = [logits[..., a:b].clone().requires_grad_() for a, b in splits]
    box_deltas = [deltas[..., a:b].clone().requires_grad_() for a, b in splits]
    anchors = [ANCHORS[a:b] for a, b in splits]
    return objectness, box_deltas, anchors


def _losses(normalization, levels):
    objectness, deltas, anchors = _inputs(levels)
    out = rpn_losses(objectness, deltas, anchors, GT, [(60, 60), (60, 60)],
                     Matcher(0.7, 0.3, allow_low_quality_matches=True),
                     BalancedPositiveNegativeSampler(BATCH_PER_IMAGE, 0.5), BoxCoder(), crowd_boxes=CROWD,
                     normalization=normalization)
    return out, objectness, deltas


@pytest.mark.parametrize("normalization", ["torchvision", "detectron"])
@pytest.mark.parametrize("levels", [1, 2])
def test_hand_computed_losses(normalization, levels):
    out, objectness, deltas = _losses(normalization, levels)
    cls, box = EXPECTED[(normalization, levels)]
    assert out["loss_rpn_cls"].item() == pytest.approx(cls, rel=1e-6)
    assert out["loss_rpn_bbox"].item() == pytest.approx(box, rel=1e-6)
    (out["loss_rpn_cls"] + out["loss_rpn_bbox"]).backward()
    assert all(o.grad is not None for o in objectness) and all(d.grad is not None for d in deltas)


def test_rules_differ_here_and_agree_when_every_image_fills_its_sample():
    assert EXPECTED[("torchvision", 2)][0] != pytest.approx(EXPECTED[("detectron", 2)][0])
    assert EXPECTED[("torchvision", 2)][1] != pytest.approx(EXPECTED[("detectron", 2)][1])
    # An image whose labelled anchors fill the sample (S = B = 3) gets the same losses under both rules.
    objectness, deltas, anchors = _inputs(2)
    kw = dict(matcher=Matcher(0.7, 0.3, allow_low_quality_matches=True),
              sampler=BalancedPositiveNegativeSampler(3, 0.5), box_coder=BoxCoder())
    one = [o[:1] for o in objectness], [d[:1] for d in deltas]
    tv = rpn_losses(*one, anchors, GT[:1], [(60, 60)], normalization="torchvision", **kw)
    dt = rpn_losses(*one, anchors, GT[:1], [(60, 60)], normalization="detectron", **kw)
    assert tv["loss_rpn_cls"].item() == pytest.approx(dt["loss_rpn_cls"].item(), rel=1e-6)
    assert tv["loss_rpn_bbox"].item() == pytest.approx(dt["loss_rpn_bbox"].item(), rel=1e-6)
    assert tv["loss_rpn_bbox"].item() == pytest.approx(BOX_IMAGE0 / 3, rel=1e-6)


def test_unknown_normalization_is_rejected():
    objectness, deltas, anchors = _inputs(1)
    with pytest.raises(ValueError, match="normalization must be one of.*'caffe'"):
        rpn_losses(objectness, deltas, anchors, GT, [(60, 60)] * 2, Matcher(0.7, 0.3),
                   BalancedPositiveNegativeSampler(4, 0.5), BoxCoder(), normalization="caffe")


@pytest.mark.parametrize("normalization", ["torchvision", "detectron"])
def test_rpn_module_takes_the_rule_from_the_config(normalization):
    cfg = get_cfg()
    cfg.merge_from_list(["RPN.LOSS_NORMALIZATION", normalization])
    rpn = RPN.from_cfg(cfg, in_channels=8, spatial_scales=[1.0 / 16])
    assert rpn.loss_normalization == normalization
