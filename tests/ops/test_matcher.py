import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou

from maskrcnn.ops.matcher import Matcher

THRESHOLDS = [(0.7, 0.3), (0.5, 0.5), (0.5, 0.0), (0.6, 0.4)]


def _random_boxes(n, size=100.0):
    xy = torch.rand(n, 2) * size
    wh = torch.rand(n, 2) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("high,low", THRESHOLDS)
@pytest.mark.parametrize("low_quality", [False, True])
def test_matches_torchvision_on_random_iou(high, low, low_quality):
    for trial in range(10):
        gt = _random_boxes(int(torch.randint(1, 12, ()).item()))
        preds = _random_boxes(int(torch.randint(1, 300, ()).item()))
        iou = box_iou(gt, preds)
        ours = Matcher(high, low, low_quality)(iou)
        expected = TVMatcher(high, low, low_quality)(iou)
        assert ours.dtype == torch.int64 and ours.shape == (preds.shape[0],)
        assert torch.equal(ours, expected), (trial, high, low, low_quality)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matches_torchvision_with_many_ties(low_quality):
    # Qualities drawn from a handful of values tie both across gts (argmax) and across predictions
    # (the low-quality restoration must keep every tied prediction).
    levels = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9])
    for _ in range(30):
        g = int(torch.randint(1, 6, ()).item())
        p = int(torch.randint(1, 40, ()).item())
        iou = levels[torch.randint(0, len(levels), (g, p))]
        ours = Matcher(0.7, 0.3, low_quality)(iou)
        expected = TVMatcher(0.7, 0.3, low_quality)(iou)
        assert torch.equal(ours, expected)


def test_threshold_bands_by_hand():
    iou = torch.tensor([[0.8, 0.5, 0.29, 0.3, 0.7], [0.1, 0.6, 0.0, 0.2, 0.69]])
    matches = Matcher(0.7, 0.3)(iou)
    # 0.8 -> gt0; 0.6 between; 0.29 below; 0.3 is between (low is inclusive); 0.7 matches (high inclusive).
    assert matches.tolist() == [0, Matcher.BETWEEN_THRESHOLDS, Matcher.BELOW_LOW_THRESHOLD, -2, 0]
    assert Matcher.BELOW_LOW_THRESHOLD == -1 and Matcher.BETWEEN_THRESHOLDS == -2


def test_low_quality_restores_ties_to_their_own_argmax():
    iou = torch.tensor(
        [
            [0.40, 0.20, 0.40, 0.00],  # gt0: best 0.4, tied at predictions 0 and 2
            [0.45, 0.10, 0.00, 0.05],  # gt1: best 0.45 at prediction 0
        ]
    )
    without = Matcher(0.5, 0.3, allow_low_quality_matches=False)(iou)
    assert without.tolist() == [-2, -1, -2, -1]
    with_lq = Matcher(0.5, 0.3, allow_low_quality_matches=True)(iou)
    # Prediction 0 is gt0's best too, but its own best gt is gt1; prediction 2 (a tie for gt0) is restored.
    assert with_lq.tolist() == [1, -1, 0, -1]
    assert torch.equal(with_lq, TVMatcher(0.5, 0.3, True)(iou))


def test_low_quality_keeps_high_quality_matches():
    iou = torch.tensor([[0.9, 0.1], [0.2, 0.25]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, 1]


def test_zero_quality_gt_ties_with_every_prediction_like_torchvision():
    iou = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ours = Matcher(0.7, 0.3, True)(iou)
    assert torch.equal(ours, TVMatcher(0.7, 0.3, True)(iou))
    assert ours.tolist() == [0, 0, 0]


@pytest.mark.parametrize("low_quality", [False, True])
def test_no_ground_truth_gives_all_negatives(low_quality):
    out = Matcher(0.7, 0.3, low_quality)(torch.zeros(0, 17))
    assert out.dtype == torch.int64
    assert out.tolist() == [Matcher.BELOW_LOW_THRESHOLD] * 17


@pytest.mark.parametrize("shape", [(3, 0), (0, 0)])
def test_no_predictions_gives_empty(shape):
    out = Matcher(0.7, 0.3, True)(torch.zeros(shape))
    assert out.shape == (0,) and out.dtype == torch.int64


def test_does_not_modify_input():
    iou = torch.rand(4, 50)
    before = iou.clone()
    Matcher(0.7, 0.3, True)(iou)
    assert torch.equal(iou, before)


def test_invalid_thresholds_raise():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(2, 3, 4)])
def test_bad_matrix_shape_raises(bad):
    with pytest.raises(ValueError, match="match_quality_matrix"):
        Matcher(0.7, 0.3)(bad)
