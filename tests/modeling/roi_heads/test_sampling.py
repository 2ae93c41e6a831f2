import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.boxes import box_iou
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler
from maskrcnn.modeling.roi_heads.sampling import SampledRoIs, label_proposals, sample_rois


def _random_boxes(n, size=200.0, min_side=4.0):
    xy = torch.rand(n, 2) * size * 0.8
    wh = torch.rand(n, 2) * size * 0.4 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def _jitter(gt, n, scale=0.15):
    """Proposals around gt boxes, so that there are foreground, ignored and background RoIs."""
    idx = torch.randint(0, gt.shape[0], (n,))
    base = gt[idx]
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    return base + torch.randn(n, 4) * wh * scale


def _parts(fg=0.5, bg_hi=0.5, batch=64, fraction=0.25):
    return (Matcher(fg, bg_hi, allow_low_quality_matches=False), BalancedPositiveNegativeSampler(batch, fraction),
            BoxCoder((10.0, 10.0, 5.0, 5.0)))


def _tv_heads(fg=0.5, bg_hi=0.5, batch=64, fraction=0.25):
    return RoIHeads(None, None, None, fg, bg_hi, batch, fraction, None, 0.05, 0.5, 100)


@pytest.mark.parametrize("fg,bg_hi,batch,fraction", [(0.5, 0.5, 64, 0.25), (0.6, 0.3, 32, 0.5), (0.5, 0.5, 512, 0.25)])
def test_identical_to_torchvision_select_training_samples(fg, bg_hi, batch, fraction):
    gts = [_random_boxes(3), _random_boxes(5), _random_boxes(1)]
    labels = [torch.randint(1, 6, (g.shape[0],)) for g in gts]
    proposals = [torch.cat([_jitter(g, 150), _random_boxes(100)]) for g in gts]
    targets = [{"boxes": g, "labels": lab} for g, lab in zip(gts, labels)]

    torch.manual_seed(7)
    tv_props, tv_matched, tv_labels, tv_targets = _tv_heads(fg, bg_hi, batch, fraction).select_training_samples(
        [p.clone() for p in proposals], targets)
    torch.manual_seed(7)
    out = sample_rois(proposals, gts, labels, *_parts(fg, bg_hi, batch, fraction))

    assert isinstance(out, SampledRoIs)
    for i in range(3):
        assert torch.equal(out.rois[i], tv_props[i])
        assert torch.equal(out.labels[i], tv_labels[i])
        assert torch.equal(out.matched_idxs[i], tv_matched[i])
        torch.testing.assert_close(out.regression_targets[i], tv_targets[i], rtol=1e-5, atol=1e-5)
        assert out.labels[i].dtype == torch.int64 and out.matched_idxs[i].dtype == torch.int64
        assert (out.labels[i] >= 0).all()  # ignored RoIs are never sampled
        assert out.rois[i].shape[0] <= batch
        assert int((out.labels[i] > 0).sum()) <= int(batch * fraction)
    # Some images really mix foreground and background, so the comparison is not vacuous.
    assert any(int((lab > 0).sum()) > 0 and int((lab == 0).sum()) > 0 for lab in out.labels)


def test_gt_boxes_are_appended_and_are_foreground():
    gt = torch.tensor([[10.0, 10.0, 50.0, 60.0], [100.0, 100.0, 150.0, 120.0]])
    props = torch.tensor([[300.0, 300.0, 320.0, 330.0]])
    out = sample_rois([props], [gt], [torch.tensor([3, 7])], *_parts(batch=10, fraction=1.0))
    rois, labels, matched = out.rois[0], out.labels[0], out.matched_idxs[0]
    assert rois.shape == (3, 4)
    assert torch.equal(rois, torch.cat([props, gt]))  # increasing original order
    assert labels.tolist() == [0, 3, 7]
    assert matched.tolist() == [0, 0, 1]
    torch.testing.assert_close(out.regression_targets[0][1:], torch.zeros(2, 4))


def test_image_without_gt_gives_background_with_zero_targets():
    props = _random_boxes(30)
    gt = [torch.zeros(0, 4), _random_boxes(2)]
    out = sample_rois([props, _random_boxes(20)], gt, [torch.zeros(0, dtype=torch.int64), torch.tensor([1, 2])],
                      *_parts(batch=16))
    assert out.rois[0].shape == (16, 4)
    assert (out.labels[0] == 0).all() and (out.matched_idxs[0] == 0).all()
    assert torch.equal(out.regression_targets[0], torch.zeros(16, 4))


def test_no_proposals_no_gt_is_empty():
    out = sample_rois([torch.zeros(0, 4)], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], *_parts())
    assert out.rois[0].shape == (0, 4) and out.labels[0].shape == (0,)
    assert out.regression_targets[0].shape == (0, 4) and out.matched_idxs[0].shape == (0,)


def test_regression_targets_decode_back_to_matched_gt():
    gt = _random_boxes(4)
    props = _jitter(gt, 100, 0.05)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    out = sample_rois([props], [gt], [torch.arange(1, 5)], Matcher(0.5, 0.5), BalancedPositiveNegativeSampler(64, 1.0),
                      coder)
    fg = out.labels[0] > 0
    assert fg.sum() > 0
    decoded = coder.decode(out.regression_targets[0][fg], out.rois[0][fg])
    torch.testing.assert_close(decoded, gt[out.matched_idxs[0][fg]], rtol=1e-4, atol=1e-3)


def test_crowd_region_ignores_proposals_inside_it():
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    crowd = torch.tensor([[100.0, 100.0, 200.0, 200.0]])
    props = torch.tensor([
        [110.0, 110.0, 130.0, 130.0],  # fully inside the crowd: IoA 1 (IoU only 0.04)
        [180.0, 180.0, 220.0, 220.0],  # IoA 0.25: kept as background
        [90.0, 90.0, 190.0, 190.0],    # IoA 0.81: ignored
        [300.0, 300.0, 310.0, 310.0],  # far: background
    ])
    labels, matched = label_proposals(props, gt, torch.tensor([2]), Matcher(0.5, 0.5), crowd_boxes=crowd,
                                      crowd_thresh=0.7)
    assert labels.tolist() == [-1, 0, -1, 0]
    out = sample_rois([props], [gt], [torch.tensor([2])], *_parts(batch=100, fraction=1.0), crowd_boxes=[crowd])
    assert torch.equal(out.rois[0], torch.cat([props[[1, 3]], gt]))
    assert out.labels[0].tolist() == [0, 0, 2]
    # Without the crowd filter every proposal is a sampled background.
    plain = sample_rois([props], [gt], [torch.tensor([2])], *_parts(batch=100, fraction=1.0))
    assert plain.rois[0].shape[0] == 5


def test_crowd_filter_applies_to_images_without_gt():
    crowd = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([[10.0, 10.0, 20.0, 20.0], [200.0, 200.0, 220.0, 220.0]])
    out = sample_rois([props], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], *_parts(),
                      crowd_boxes=[crowd])
    assert torch.equal(out.rois[0], props[1:])


def test_bg_thresh_lo_ignores_easy_background():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([
        [0.0, 0.0, 100.0, 40.0],     # IoU 0.4: background in [0.1, 0.5)
        [0.0, 0.0, 100.0, 5.0],      # IoU 0.05: below BG_THRESH_LO, ignored
        [500.0, 500.0, 510.0, 510.0],  # IoU 0: ignored
    ])
    labels, _ = label_proposals(props, gt, torch.tensor([1]), Matcher(0.5, 0.5), bg_thresh_lo=0.1)
    assert labels.tolist() == [0, -1, -1]
    labels0, _ = label_proposals(props, gt, torch.tensor([1]), Matcher(0.5, 0.5), bg_thresh_lo=0.0)
    assert labels0.tolist() == [0, 0, 0]
    iou = box_iou(gt, props)[0]
    assert 0.39 < float(iou[0]) < 0.41 and float(iou[1]) < 0.1


def test_between_thresholds_are_never_sampled():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor([[0.0, 0.0, 100.0, 40.0]])  # IoU 0.4 in [0.3, 0.6)
    labels, _ = label_proposals(props, gt, torch.tensor([1]), Matcher(0.6, 0.3))
    assert labels.tolist() == [-1]
    out = sample_rois([props], [gt], [torch.tensor([1])], *_parts(0.6, 0.3, batch=10))
    assert out.rois[0].shape[0] == 1 and out.labels[0].tolist() == [1]


def test_generator_makes_sampling_reproducible():
    gt = _random_boxes(3)
    props = _random_boxes(400)
    args = ([props], [gt], [torch.tensor([1, 2, 3])], *_parts(batch=32))
    a = sample_rois(*args, generator=torch.Generator().manual_seed(3))
    b = sample_rois(*args, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.rois[0], b.rois[0])


def test_bad_inputs_are_named():
    coder_parts = _parts()
    with pytest.raises(ValueError, match="one entry per image"):
        sample_rois([torch.zeros(1, 4)], [], [], *coder_parts)
    with pytest.raises(ValueError, match=r"proposals\[0\]"):
        sample_rois([torch.zeros(1, 5)], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], *coder_parts)
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        sample_rois([torch.zeros(1, 4)], [torch.zeros(2, 4)], [torch.zeros(1, dtype=torch.int64)], *coder_parts)
    with pytest.raises(TypeError, match="proposals"):
        sample_rois(torch.zeros(1, 4), [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], *coder_parts)
