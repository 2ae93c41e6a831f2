"""Anchor fitting: the per-box best IoU equals a brute-force search over every anchor the model builds, and the fit
raises recall above the default anchors on a skewed dataset (tiny and tall boxes)."""
import numpy as np
import torch

from maskrcnn.modeling.rpn.anchor_fit import (anchor_quality, best_anchor_iou, candidate_ratio_sets,
                                              fit_fpn_anchors, fpn_anchor_levels)
from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.ops import box_iou


def test_best_iou_equals_brute_force_over_the_generators_anchors():
    rng = np.random.default_rng(0)
    h, w = 96, 160
    wh = rng.uniform(4, 80, size=(40, 2))
    xy = rng.uniform(0, 1, size=(40, 2)) * (np.array([w, h]) - wh)
    boxes = np.concatenate([xy, xy + wh], 1)
    sizes, strides = fpn_anchor_levels(12, 2, 6)
    ratios = (0.5, 1.0, 2.0)
    gen = AnchorGenerator([(s,) for s in sizes], ratios, strides)
    feats = [torch.zeros(1, 1, int(np.ceil(h / s)), int(np.ceil(w / s))) for s in strides]
    anchors = torch.cat(gen(feats)).double()
    brute = box_iou(torch.from_numpy(boxes), anchors).max(1).values.numpy()
    ours = best_anchor_iou(boxes, np.tile([h, w], (40, 1)), sizes, strides, ratios)
    np.testing.assert_allclose(ours, brute, atol=1e-9)


def test_fit_raises_recall_on_a_skewed_dataset():
    rng = np.random.default_rng(1)
    # 6-12 px boxes, three times taller than wide, in 128 px images: the default 32 px square-ish anchors miss them.
    side = rng.uniform(6, 12, size=300)
    wh = np.stack([side / np.sqrt(3), side * np.sqrt(3)], 1)
    xy = rng.uniform(0, 1, size=(300, 2)) * (128 - wh)
    boxes = np.concatenate([xy, xy + wh], 1)
    hw = np.full((300, 2), 128.0)
    default = anchor_quality(boxes, hw, 32, (0.5, 1.0, 2.0))
    fit = fit_fpn_anchors(boxes, hw)
    assert default.recall < 0.05
    assert fit.quality.recall > 0.5 and fit.quality.recall > default.recall + 0.45
    assert fit.quality.mean_iou > default.mean_iou + 0.2
    assert fit.start_size <= 12 and max(fit.ratios) >= 2.5
    assert fit.tried == len(candidate_ratio_sets(wh[:, 1] / wh[:, 0])) * 9


def test_candidate_ratio_sets_follow_the_data():
    sets = candidate_ratio_sets(np.array([3.0] * 50 + [2.5] * 50))
    assert (1.0,) in sets and (0.5, 1.0, 2.0) in sets
    assert any(all(r >= 2.5 for r in s) for s in sets)
