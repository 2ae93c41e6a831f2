"""Box voting (Detectron's ``box_voting``) against hand-computed small cases, every scoring method."""
import math

import pytest
import torch

from maskrcnn.ops.box_voting import BOX_VOTING_METHODS, BoxVoting, box_voting

# Detection A (class 1) and the candidates it was chosen from: A itself, B (IoU 9/11 with A), C (IoU 0.5, below the
# 0.8 threshold) and D (same box as A but class 2: never votes for a class-1 detection).
A = [0.0, 0.0, 10.0, 10.0]
ALL_BOXES = torch.tensor([A, [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 20.0], A])
ALL_SCORES = torch.tensor([0.9, 0.6, 0.5, 0.7])
ALL_LABELS = torch.tensor([1, 1, 1, 2])


def _vote(method, beta=1.0, thresh=0.8, legacy=False):
    return box_voting(torch.tensor([A]), torch.tensor([0.9]), torch.tensor([1]), ALL_BOXES, ALL_SCORES, ALL_LABELS,
                      thresh, method, beta, legacy_plus_one=legacy)


def test_voted_box_is_the_score_weighted_mean_of_same_class_overlapping_candidates():
    boxes, _ = _vote("ID")
    # (0.9 * A + 0.6 * B) / 1.5: C is under the threshold, D is another class.
    torch.testing.assert_close(boxes, torch.tensor([[0.4, 0.0, 10.4, 10.0]]))
    boxes, _ = _vote("ID", thresh=0.5)  # C votes too: (0.9 A + 0.6 B + 0.5 C) / 2.0
    torch.testing.assert_close(boxes, torch.tensor([[0.3, 0.0, 10.3, 12.5]]))


@pytest.mark.parametrize("method, beta, expected", [
    ("ID", 1.0, 0.9),
    ("AVG", 1.0, 0.75),
    ("IOU_AVG", 1.0, (1.0 * 0.9 + 9 / 11 * 0.6) / (1.0 + 9 / 11)),  # = 0.765
    ("GENERALIZED_AVG", 2.0, math.sqrt((0.9 ** 2 + 0.6 ** 2) / 2)),
    ("QUASI_SUM", 1.0, 1.5 / 2),
    ("QUASI_SUM", 0.5, 1.5 / math.sqrt(2)),
    ("TEMP_AVG", 1.0, 0.75),  # temperature 1 is the plain mean
    ("TEMP_AVG", 2.0, (math.sqrt(0.9) / (math.sqrt(0.9) + math.sqrt(0.1))
                       + math.sqrt(0.6) / (math.sqrt(0.6) + math.sqrt(0.4))) / 2),
])
def test_scoring_methods(method, beta, expected):
    _, scores = _vote(method, beta)
    assert scores.item() == pytest.approx(expected, rel=1e-6)


def test_legacy_plus_one_iou():
    # With +1 widths A and B overlap 110 / 132 = 0.833; B's weight in IOU_AVG changes accordingly.
    _, scores = _vote("IOU_AVG", legacy=True)
    w = 110 / 132
    assert scores.item() == pytest.approx((0.9 + w * 0.6) / (1 + w), rel=1e-6)
    _, strict = _vote("IOU_AVG", thresh=0.83, legacy=False)  # 9/11 = 0.818 < 0.83: A votes alone
    assert strict.item() == pytest.approx(0.9)


def test_several_detections_and_classes_are_voted_independently():
    top_boxes = torch.tensor([A, A, [50.0, 50.0, 60.0, 60.0]])
    top_scores, top_labels = torch.tensor([0.9, 0.7, 0.3]), torch.tensor([1, 2, 1])
    boxes, scores = box_voting(top_boxes, top_scores, top_labels, ALL_BOXES, ALL_SCORES, ALL_LABELS, 0.8, "AVG")
    torch.testing.assert_close(boxes, torch.tensor([[0.4, 0.0, 10.4, 10.0], A, [50.0, 50.0, 60.0, 60.0]]))
    # Class 2 has only D (itself); the third detection is not among the candidates: no voter, unchanged.
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.7, 0.3]))


def test_empty_inputs_and_bad_settings():
    empty = torch.zeros((0, 4))
    b, s = box_voting(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), ALL_BOXES, ALL_SCORES, ALL_LABELS,
                      0.8)
    assert b.shape == (0, 4) and s.shape == (0,)
    with pytest.raises(ValueError, match="TEST.BBOX_VOTE.SCORING_METHOD"):
        BoxVoting(0.8, "MEDIAN")
    with pytest.raises(ValueError, match="TEST.BBOX_VOTE.VOTE_TH"):
        BoxVoting(1.5)
    with pytest.raises(ValueError, match="SCORING_METHOD_BETA"):
        BoxVoting(0.8, "QUASI_SUM", 0.0)
    assert BoxVoting().keeps_scores and not BoxVoting(scoring_method="AVG").keeps_scores


def test_config_accepts_exactly_the_implemented_methods():
    from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg

    for method in BOX_VOTING_METHODS:
        cfg = get_cfg()
        cfg.merge_from_list(["TEST.BBOX_VOTE.SCORING_METHOD", method])
        assert_and_infer_cfg(cfg)
    cfg = get_cfg()
    cfg.merge_from_list(["TEST.BBOX_VOTE.SCORING_METHOD", "MEDIAN"])
    with pytest.raises(ConfigError, match="TEST.BBOX_VOTE.SCORING_METHOD = 'MEDIAN' is not allowed"):
        assert_and_infer_cfg(cfg)
