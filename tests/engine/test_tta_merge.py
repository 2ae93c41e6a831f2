"""Detectron's merge heuristics of test-time augmentation against hand-computed small cases."""
import math

import pytest
import torch

from maskrcnn.engine.tta_merge import mask_logit, merge_box_predictions, merge_mask_probs

# Two runs of the same 2 RoIs (K = 1 class + background): the flipped run first, the plain run last (Detectron).
S_FLIP = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
S_PLAIN = torch.tensor([[0.4, 0.6], [0.5, 0.5]])
B_FLIP = torch.tensor([[0.0, 0.0, 4.0, 4.0, 1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0, 2.0, 2.0, 8.0, 8.0]])
B_PLAIN = torch.tensor([[0.0, 0.0, 4.0, 4.0, 1.0, 1.0, 7.0, 7.0], [2.0, 2.0, 6.0, 6.0, 4.0, 4.0, 8.0, 8.0]])


def test_union_stacks_every_run_rois_in_order():
    s, b = merge_box_predictions([S_FLIP, S_PLAIN], [B_FLIP, B_PLAIN], identity_index=-1)
    assert torch.equal(s, torch.cat([S_FLIP, S_PLAIN])) and torch.equal(b, torch.cat([B_FLIP, B_PLAIN]))
    # Different RoI counts per run are the normal case with RPN proposals.
    s, _ = merge_box_predictions([S_FLIP[:1], S_PLAIN], [B_FLIP[:1], B_PLAIN])
    assert s.shape == (3, 2)


def test_avg_and_id():
    s, b = merge_box_predictions([S_FLIP, S_PLAIN], [B_FLIP, B_PLAIN], score_heur="AVG", coord_heur="AVG")
    torch.testing.assert_close(s, torch.tensor([[0.3, 0.7], [0.55, 0.45]]))
    torch.testing.assert_close(b, torch.tensor([[0.0, 0.0, 4.0, 4.0, 1.0, 1.0, 6.0, 6.0],
                                                [2.0, 2.0, 6.0, 6.0, 3.0, 3.0, 8.0, 8.0]]))
    s, b = merge_box_predictions([S_FLIP, S_PLAIN], [B_FLIP, B_PLAIN], identity_index=-1, score_heur="ID",
                                 coord_heur="ID")
    assert torch.equal(s, S_PLAIN) and torch.equal(b, B_PLAIN)
    # Detectron allows mixing ID and AVG (never with UNION).
    s, b = merge_box_predictions([S_FLIP, S_PLAIN], [B_FLIP, B_PLAIN], score_heur="AVG", coord_heur="ID")
    torch.testing.assert_close(s[0], torch.tensor([0.3, 0.7]))
    assert torch.equal(b, B_PLAIN)


def test_box_heuristic_errors():
    with pytest.raises(ValueError, match="set both to 'UNION' or neither"):
        merge_box_predictions([S_PLAIN], [B_PLAIN], score_heur="UNION", coord_heur="AVG")
    with pytest.raises(ValueError, match="'AVG' needs the same RoIs in every augmentation"):
        merge_box_predictions([S_FLIP[:1], S_PLAIN], [B_FLIP[:1], B_PLAIN], score_heur="AVG", coord_heur="AVG")
    with pytest.raises(ValueError, match="SCORE_HEUR = 'MAX' is not known"):
        merge_box_predictions([S_PLAIN], [B_PLAIN], score_heur="MAX", coord_heur="ID")


M_A = torch.tensor([[[[0.9, 0.2], [0.5, 1.0]]]])  # (N=1, C=1, M=2, M=2)
M_B = torch.tensor([[[[0.1, 0.4], [0.5, 0.0]]]])


def test_mask_soft_avg_and_soft_max():
    torch.testing.assert_close(merge_mask_probs([M_A, M_B], "SOFT_AVG"), torch.tensor([[[[0.5, 0.3], [0.5, 0.5]]]]))
    torch.testing.assert_close(merge_mask_probs([M_A, M_B], "SOFT_MAX"), torch.tensor([[[[0.9, 0.4], [0.5, 1.0]]]]))


def test_mask_logit_avg():
    def logit(p):
        return -math.log((1 - p) / max(p, 1e-20))

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    out = merge_mask_probs([M_A, M_B], "LOGIT_AVG")[0, 0]
    # 0.9 and 0.1 are opposite logits: their mean is 0, probability 0.5.
    assert out[0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(sigmoid((logit(0.2) + logit(0.4)) / 2), rel=1e-5)
    assert out[1, 0].item() == pytest.approx(0.5, abs=1e-6)
    # p = 1 has logit +inf (Detectron's formula): the merged probability is 1, whatever the other runs say.
    assert out[1, 1].item() == 1.0
    assert mask_logit(torch.tensor([0.0])).item() == pytest.approx(-math.log(1e20), rel=1e-6)  # the 1e-20 floor


def test_mask_heuristic_errors():
    with pytest.raises(ValueError, match="TEST.MASK_AUG.HEUR = 'MEDIAN' is not known"):
        merge_mask_probs([M_A], "MEDIAN")
    with pytest.raises(ValueError, match="same shape"):
        merge_mask_probs([M_A, M_A[:, :, :1]])
    assert torch.equal(merge_mask_probs([M_A], "LOGIT_AVG"), torch.sigmoid(mask_logit(M_A)))
