import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.modeling.rpn.loss import assign_anchor_labels, rpn_losses
from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler

GRIDS = [(8, 10), (4, 5)]
SIZES = [(60, 75), (64, 80)]


def _matcher():
    return Matcher(0.7, 0.3, allow_low_quality_matches=True)


def _one_anchor(logit, delta):
    """One image, one level with a single anchor at one location."""
    return ([torch.tensor([[[[float(logit)]]]], requires_grad=True)],
            [torch.tensor(delta, dtype=torch.float32).reshape(1, 4, 1, 1).requires_grad_()])


def test_anchor_equal_to_gt_zero_box_loss_and_known_bce():
    objectness, deltas = _one_anchor(2.0, [0.0, 0.0, 0.0, 0.0])
    anchors = [torch.tensor([[4.0, 6.0, 20.0, 30.0]])]
    out = rpn_losses(objectness, deltas, anchors, [anchors[0].clone()], [(40, 40)], _matcher(),
                     BalancedPositiveNegativeSampler(256, 0.5), BoxCoder())
    assert out["loss_rpn_bbox"].item() == 0.0
    # positive anchor with logit 2: BCE = log(1 + exp(-2))
    assert out["loss_rpn_cls"].item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-7)
    (out["loss_rpn_cls"] + out["loss_rpn_bbox"]).backward()
    assert objectness[0].grad is not None and deltas[0].grad is not None


def test_known_smooth_l1_value():
    objectness, deltas = _one_anchor(0.0, [0.05, -0.3, 0.0, 0.0])
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    out = rpn_losses(objectness, deltas, anchors, [anchors[0].clone()], [(40, 40)], _matcher(),
                     BalancedPositiveNegativeSampler(256, 0.5), BoxCoder())
    # beta = 1/9: |0.05| < beta -> 0.5 * 0.05**2 * 9; |0.3| >= beta -> 0.3 - 0.5 / 9; one sampled anchor
    assert out["loss_rpn_bbox"].item() == pytest.approx(0.5 * 0.0025 * 9 + 0.3 - 0.5 / 9, rel=1e-6)
    assert out["loss_rpn_cls"].item() == pytest.approx(math.log(2.0), rel=1e-6)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    objectness = [torch.randn(2, 3, h, w, generator=g, requires_grad=True) for h, w in GRIDS]
    deltas = [(torch.randn(2, 12, h, w, generator=g) * 0.1).requires_grad_() for h, w in GRIDS]
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2, strides=[8, 16])(objectness)
    gt = [torch.tensor([[10.0, 10, 30, 25], [40, 20, 70, 55], [5, 35, 25, 60]]), torch.tensor([[20.0, 8, 50, 40]])]
    return objectness, deltas, anchors, gt


def _torchvision_losses(objectness, deltas, anchors, gt, batch_size):
    tv = RegionProposalNetwork(None, None, 0.7, 0.3, batch_size, 0.5, dict(training=1, testing=1),
                               dict(training=1, testing=1), 0.7)
    per_image = [torch.cat(anchors)] * objectness[0].shape[0]
    labels, matched = tv.assign_targets_to_anchors(per_image, [{"boxes": b} for b in gt])
    targets = tv.box_coder.encode(matched, per_image)
    obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
    return tv.compute_loss(obj_flat, deltas_flat, labels, targets)


@pytest.mark.parametrize("batch_size", [32, 100000])  # sampling active / every labelled anchor sampled
def test_equal_to_torchvision_with_same_sampling(batch_size):
    objectness, deltas, anchors, gt = _batch()
    torch.manual_seed(11)
    ref_cls, ref_box = _torchvision_losses(objectness, deltas, anchors, gt, batch_size)
    torch.manual_seed(11)
    out = rpn_losses(objectness, deltas, anchors, gt, SIZES, _matcher(),
                     BalancedPositiveNegativeSampler(batch_size, 0.5), BoxCoder())
    assert ref_box.item() > 0
    torch.testing.assert_close(out["loss_rpn_cls"], ref_cls, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss_rpn_bbox"], ref_box, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(out["loss_rpn_cls"] + out["loss_rpn_bbox"], objectness + deltas)
    ref_grads = torch.autograd.grad(ref_cls + ref_box, objectness + deltas)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_explicit_generator_makes_sampling_reproducible():
    objectness, deltas, anchors, gt = _batch(seed=2)
    sampler = BalancedPositiveNegativeSampler(16, 0.5)
    a = rpn_losses(objectness, deltas, anchors, gt, SIZES, _matcher(), sampler, BoxCoder(),
                   generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = rpn_losses(objectness, deltas, anchors, gt, SIZES, _matcher(), sampler, BoxCoder(),
                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["loss_rpn_cls"], b["loss_rpn_cls"]) and torch.equal(a["loss_rpn_bbox"], b["loss_rpn_bbox"])


def test_image_without_gt_is_all_negative():
    objectness, deltas, anchors, gt = _batch()
    gt = [torch.zeros(0, 4), gt[1]]
    labels, _ = assign_anchor_labels(torch.cat(anchors), gt[0], SIZES[0], _matcher())
    assert labels.dtype == torch.int64 and (labels == 0).all()
    # every anchor sampled: the classification loss is the mean BCE over all labelled anchors of both images
    out = rpn_losses(objectness, deltas, anchors, gt, SIZES, _matcher(),
                     BalancedPositiveNegativeSampler(10 ** 6, 0.5), BoxCoder())
    torch.manual_seed(0)
    ref_cls, ref_box = _torchvision_losses(objectness, deltas, anchors, gt, 10 ** 6)
    torch.testing.assert_close(out["loss_rpn_cls"], ref_cls, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss_rpn_bbox"], ref_box, rtol=1e-6, atol=0)
    # only the empty image: no positives at all
    out = rpn_losses([o[:1] for o in objectness], [d[:1] for d in deltas], anchors, [torch.zeros(0, 4)], SIZES[:1],
                     _matcher(), BalancedPositiveNegativeSampler(10 ** 6, 0.5), BoxCoder())
    logits = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectness])
    assert out["loss_rpn_bbox"].item() == 0.0
    torch.testing.assert_close(out["loss_rpn_cls"], F.softplus(logits).mean())


def test_straddle_thresh_ignores_and_unmatches_border_anchors():
    anchors = torch.tensor([[0.0, 0, 10, 10], [-5, 0, 5, 10]])
    gt = torch.tensor([[-5.0, 0, 5, 10]])
    labels, matched = assign_anchor_labels(anchors, gt, (20, 20), _matcher())
    assert labels.tolist() == [-1, 1]  # IoU 1/3 (between thresholds) and 1
    labels, matched = assign_anchor_labels(anchors, gt, (20, 20), _matcher(), straddle_thresh=0)
    # the border anchor is ignored and takes no part in matching: the inside anchor becomes the gt's best
    assert labels.tolist() == [1, -1] and matched[0].item() == 0
    labels, _ = assign_anchor_labels(anchors, gt, (20, 20), _matcher(), straddle_thresh=5)
    assert labels.tolist() == [-1, 1]
    # continuous convention: an anchor ending exactly on the border is inside
    labels, _ = assign_anchor_labels(torch.tensor([[10.0, 10, 20, 20]]), torch.zeros(0, 4), (20, 20), _matcher(),
                                     straddle_thresh=0)
    assert labels.tolist() == [0]
    labels, _ = assign_anchor_labels(torch.tensor([[10.0, 10, 20, 20]]), torch.zeros(0, 4), (20, 20), _matcher(),
                                     straddle_thresh=0, legacy_plus_one=True)
    assert labels.tolist() == [-1]  # inclusive: the last pixel is 19


def test_crowd_regions_ignore_covered_anchors():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [30, 30, 50, 50], [60, 0, 70, 10]])
    gt = torch.tensor([[20.0, 20, 40, 40]])
    crowd = torch.tensor([[15.0, 15, 45, 45]])
    labels, _ = assign_anchor_labels(anchors, gt, (80, 80), _matcher())
    assert labels.tolist() == [0, 1, 0, 0]
    labels, _ = assign_anchor_labels(anchors, gt, (80, 80), _matcher(), crowd_boxes=crowd)
    # anchor 1 lies inside the crowd (IoA 1), anchor 2 for 15*15/400 = 0.56 < 0.7 of its area
    assert labels.tolist() == [0, -1, 0, 0]
    labels, _ = assign_anchor_labels(anchors, gt, (80, 80), _matcher(), crowd_boxes=crowd, crowd_thresh=0.5)
    assert labels.tolist() == [0, -1, -1, 0]
    labels, _ = assign_anchor_labels(anchors, gt, (80, 80), _matcher(), crowd_boxes=torch.zeros(0, 4))
    assert labels.tolist() == [0, 1, 0, 0]


def test_degenerate_gt_is_not_matched():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]])
    gt = torch.tensor([[5.0, 5, 5, 30], [20, 20, 40, 40]])  # the first has zero width
    labels, matched = assign_anchor_labels(anchors, gt, (80, 80), _matcher())
    assert labels.tolist() == [0, 1, 0] and matched[1].item() == 0  # index into the non-degenerate boxes
    objectness, deltas = [torch.zeros(1, 1, 1, 3)], [torch.zeros(1, 4, 1, 3)]
    out = rpn_losses(objectness, deltas, [anchors], [gt], [(80, 80)], _matcher(),
                     BalancedPositiveNegativeSampler(256, 0.5), BoxCoder())
    assert out["loss_rpn_bbox"].item() == 0.0


def test_legacy_iou_convention_follows_box_coder():
    anchors = [torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 6]])]
    gt = [torch.tensor([[0.0, 0, 9, 6]])]
    # anchor 0: IoU 54/81 = 0.667 with continuous widths (ignored), 70/100 = 0.7 with inclusive ones (positive)
    labels, _ = assign_anchor_labels(anchors[0], gt[0], (20, 20), _matcher())
    assert labels.tolist() == [-1, 1]
    labels, _ = assign_anchor_labels(anchors[0], gt[0], (20, 20), _matcher(), legacy_plus_one=True)
    assert labels.tolist() == [1, 1]
    objectness, deltas = [torch.zeros(1, 1, 1, 2)], [torch.zeros(1, 4, 1, 2)]
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    cont = rpn_losses(objectness, deltas, anchors, gt, [(20, 20)], _matcher(), sampler, BoxCoder())
    legacy = rpn_losses(objectness, deltas, anchors, gt, [(20, 20)], _matcher(), sampler,
                        BoxCoder(legacy_plus_one=True))
    assert cont["loss_rpn_bbox"].item() == 0.0  # only the exact anchor is sampled
    # legacy: anchor 0 (10 x 10, centre y 5) is positive too; gt is 10 x 7 with centre y 3.5:
    # dy = -1.5 / 10, dh = log(7 / 10), both beyond beta; two sampled anchors
    expected = ((0.15 - 0.5 / 9) + (-math.log(0.7) - 0.5 / 9)) / 2
    assert legacy["loss_rpn_bbox"].item() == pytest.approx(expected, rel=1e-5)


def test_nothing_sampled_gives_zero_losses_with_graph():
    objectness = [torch.zeros(1, 1, 1, 1, requires_grad=True)]
    deltas = [torch.zeros(1, 4, 1, 1, requires_grad=True)]
    anchors = [torch.tensor([[-50.0, -50, 50, 50]])]
    out = rpn_losses(objectness, deltas, anchors, [torch.zeros(0, 4)], [(20, 20)], _matcher(),
                     BalancedPositiveNegativeSampler(256, 0.5), BoxCoder(), straddle_thresh=0)
    assert out["loss_rpn_cls"].item() == 0.0 and out["loss_rpn_bbox"].item() == 0.0
    (out["loss_rpn_cls"] + out["loss_rpn_bbox"]).backward()
    assert objectness[0].grad is not None


def test_bad_inputs():
    objectness, deltas, anchors, gt = _batch()
    args = (_matcher(), BalancedPositiveNegativeSampler(256, 0.5), BoxCoder())
    with pytest.raises(ValueError, match="gt_boxes"):
        rpn_losses(objectness, deltas, anchors, gt[:1], SIZES, *args)
    with pytest.raises(ValueError, match="anchors"):
        rpn_losses(objectness, deltas, anchors[:1], gt, SIZES, *args)
    with pytest.raises(ValueError, match="gt boxes"):
        rpn_losses(objectness, deltas, anchors, [torch.ones(2, 5), gt[1]], SIZES, *args)
