import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from maskrcnn.modeling.roi_heads.inference import postprocess_detections, select_detections
from maskrcnn.ops import _backend
from maskrcnn.ops.box_coder import BoxCoder

SIZES = [(100, 120), (90, 80)]
K1 = 6  # 5 classes + background


def _tv(score_thresh, nms_thresh, per_img):
    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh, per_img)


def _inputs(counts=(40, 25)):
    proposals = []
    for n, (h, w) in zip(counts, SIZES):
        # Clusters of overlapping boxes (so NMS suppresses), some crossing the border (so clipping matters) and
        # some entirely outside (clipped to zero width, removed as small).
        centers = torch.rand(4, 2) * torch.tensor([w, h])
        c = centers[torch.randint(0, 4, (n,))] + torch.randn(n, 2) * 4
        wh = torch.rand(n, 2) * 30 + 10
        boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
        boxes[:3] += torch.tensor([float(w) + 50, 0.0, float(w) + 50, 0.0])
        proposals.append(boxes)
    r = sum(counts)
    # Logits are a random permutation of a 0.02-spaced grid: no two candidates tie, so the order is unambiguous.
    logits = torch.randperm(r * K1).float().reshape(r, K1) * 0.02
    deltas = torch.randn(r, 4 * K1) * 0.5
    return logits, deltas, proposals


@pytest.mark.parametrize("backend", ["native", "torchvision"])
@pytest.mark.parametrize("score_thresh,nms_thresh,per_img", [(0.05, 0.5, 100), (0.0, 0.3, 7), (0.2, 0.7, 100)])
def test_identical_to_torchvision_postprocess_detections(backend, score_thresh, nms_thresh, per_img):
    logits, deltas, proposals = _inputs()
    tv_boxes, tv_scores, tv_labels = _tv(score_thresh, nms_thresh, per_img).postprocess_detections(
        logits, deltas, proposals, SIZES)
    with _backend.use_backend(backend):
        boxes, scores, labels = postprocess_detections(logits, deltas, proposals, SIZES, BoxCoder((10, 10, 5, 5)),
                                                       score_thresh, nms_thresh, per_img)
    assert len(boxes) == 2
    for b, s, lab, tb, ts, tl in zip(boxes, scores, labels, tv_boxes, tv_scores, tv_labels):
        assert b.shape[0] > 0
        assert torch.equal(lab, tl) and lab.dtype == torch.int64
        torch.testing.assert_close(s, ts)
        torch.testing.assert_close(b, tb)
        assert b.shape[0] <= per_img and (lab >= 1).all() and (s > score_thresh).all()
        assert torch.all(s[:-1] >= s[1:])


def test_steps_are_exercised():
    logits, deltas, proposals = _inputs()
    coder = BoxCoder((10, 10, 5, 5))
    few, _, _ = postprocess_detections(logits, deltas, proposals, SIZES, coder, 0.0, 0.3, 1000)
    none, _, _ = postprocess_detections(logits, deltas, proposals, SIZES, coder, 0.0, 1.0, 1000)
    # NMS suppresses something; without it, everything but the empty (outside-the-image) boxes survives.
    assert few[0].shape[0] < none[0].shape[0] < proposals[0].shape[0] * (K1 - 1)
    h, w = SIZES[0]
    assert float(none[0][:, 0::2].max()) <= w and float(none[0][:, 1::2].max()) <= h
    assert float(none[0].min()) >= 0


def test_class_agnostic_equals_repeated_class_specific():
    logits, deltas, proposals = _inputs()
    agnostic = torch.randn(deltas.shape[0], 8)
    coder = BoxCoder((10, 10, 5, 5))
    ref = postprocess_detections(logits, agnostic[:, 4:].repeat(1, K1), proposals, SIZES, coder, 0.05, 0.5, 100)
    for d in (agnostic, agnostic[:, 4:]):
        out = postprocess_detections(logits, d, proposals, SIZES, coder, 0.05, 0.5, 100, cls_agnostic=True)
        for a, b in zip(out, ref):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="box_regression"):
        postprocess_detections(logits, agnostic, proposals, SIZES, coder, 0.05, 0.5, 100)


def test_empty_images_and_min_size():
    logits, deltas, proposals = _inputs((0, 12))
    coder = BoxCoder((10, 10, 5, 5))
    boxes, scores, labels = postprocess_detections(logits, deltas, proposals, SIZES, coder, 0.0, 0.5, 100)
    assert boxes[0].shape == (0, 4) and scores[0].shape == (0,) and labels[0].shape == (0,)
    assert boxes[1].shape[0] > 0
    big, _, _ = postprocess_detections(logits, deltas, proposals, SIZES, coder, 0.0, 1.0, 100, min_size=15.0)
    assert (big[1][:, 2:] - big[1][:, :2] >= 15.0).all()
    out = postprocess_detections(torch.zeros(0, K1), torch.zeros(0, 4 * K1), [torch.zeros(0, 4)], SIZES[:1], coder,
                                 0.05, 0.5, 100)
    assert out[0][0].shape == (0, 4)


def test_legacy_plus_one_clips_to_last_pixel():
    proposals = [torch.tensor([[50.0, 50.0, 500.0, 500.0]])]
    logits = torch.tensor([[0.0, 5.0]])
    deltas = torch.zeros(1, 8)
    boxes, _, _ = postprocess_detections(logits, deltas, proposals, [(100, 120)],
                                         BoxCoder((10, 10, 5, 5), legacy_plus_one=True), 0.05, 0.5, 100)
    assert boxes[0].tolist() == [[50.0, 50.0, 119.0, 99.0]]
    boxes, _, _ = postprocess_detections(logits, deltas, proposals, [(100, 120)], BoxCoder((10, 10, 5, 5)),
                                         0.05, 0.5, 100)
    assert boxes[0].tolist() == [[50.0, 50.0, 120.0, 100.0]]


def test_bad_inputs_are_named():
    logits, deltas, proposals = _inputs()
    coder = BoxCoder((10, 10, 5, 5))
    with pytest.raises(ValueError, match="proposals hold"):
        postprocess_detections(logits[:-1], deltas[:-1], proposals, SIZES, coder, 0.05, 0.5, 100)
    with pytest.raises(ValueError, match="image sizes"):
        postprocess_detections(logits, deltas, proposals, SIZES[:1], coder, 0.05, 0.5, 100)


def test_select_detections_breaks_score_ties_by_roi_or_by_class():
    # Two RoIs far apart, three classes all scoring alike: the limit keeps the first candidates in the tie order.
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.1, 0.3, 0.3, 0.3]])
    boxes = torch.tensor([[0.0, 0, 10, 10] * 4, [50.0, 50, 60, 60] * 4])
    b, s, lab = select_detections(probs, boxes, 0.05, 0.5, 3)
    assert lab.tolist() == [1, 2, 3] and b[:, 0].tolist() == [0, 0, 0]  # RoI 0's classes first (torchvision)
    b, s, lab = select_detections(probs, boxes, 0.05, 0.5, 3, class_major=True)
    assert lab.tolist() == [1, 1, 2] and b[:, 0].tolist() == [0, 50, 0]  # class 1's RoIs first (Detectron)
    assert torch.all(s == 0.3)
    with pytest.raises(ValueError, match="to match probs"):
        select_detections(probs, boxes[:, :8], 0.05, 0.5, 3)


def test_select_detections_min_size_none_keeps_empty_boxes():
    probs = torch.tensor([[0.2, 0.8]])
    boxes = torch.tensor([[0.0, 0, 0, 0, 5, 5, 5, 9]])  # zero width
    assert select_detections(probs, boxes, 0.05, 0.5, 10)[0].shape[0] == 0
    assert select_detections(probs, boxes, 0.05, 0.5, 10, min_size=None)[0].shape[0] == 1


def _voting_inputs():
    # Three RoIs, one foreground class: RoIs 0 and 1 overlap (IoU 0.818, suppressed by NMS 0.5), RoI 2 stands apart.
    probs = torch.tensor([[0.1, 0.9], [0.4, 0.6], [0.3, 0.7]])
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 11.0, 10.0],
                          [0.0, 0.0, 0.0, 0.0, 50.0, 50.0, 60.0, 60.0]])
    return probs, boxes


def test_select_detections_with_box_voting_id_keeps_scores_and_refines_boxes():
    from maskrcnn.ops.box_voting import BoxVoting

    probs, boxes = _voting_inputs()
    b, s, lab = select_detections(probs, boxes, 0.05, 0.5, 10, box_voting=BoxVoting(0.8, "ID"))
    torch.testing.assert_close(b, torch.tensor([[0.4, 0.0, 10.4, 10.0], [50.0, 50.0, 60.0, 60.0]]))
    torch.testing.assert_close(s, torch.tensor([0.9, 0.7]))
    assert lab.tolist() == [1, 1]
    plain = select_detections(probs, boxes, 0.05, 0.5, 10)
    torch.testing.assert_close(plain[1], s)  # the same survivors, in the same order


def test_select_detections_with_voted_scores_reranks_before_the_limit():
    from maskrcnn.ops.box_voting import BoxVoting

    probs, boxes = _voting_inputs()
    # AVG: the first detection's score becomes (0.9 + 0.6) / 2 = 0.75 > 0.7; QUASI_SUM with beta 1 as well. With
    # beta 2 it becomes 1.5 / 4 = 0.375 and falls behind RoI 2: with a limit of 1 only RoI 2 is kept.
    b, s, _ = select_detections(probs, boxes, 0.05, 0.5, 1, box_voting=BoxVoting(0.8, "QUASI_SUM", 2.0))
    torch.testing.assert_close(s, torch.tensor([0.7]))
    torch.testing.assert_close(b, torch.tensor([[50.0, 50.0, 60.0, 60.0]]))
    b, s, _ = select_detections(probs, boxes, 0.05, 0.5, 10, box_voting=BoxVoting(0.8, "AVG"))
    torch.testing.assert_close(s, torch.tensor([0.75, 0.7]))


def test_roi_heads_and_detectron_api_read_bbox_vote():
    import numpy as np

    from maskrcnn.config import assert_and_infer_cfg, get_cfg
    from maskrcnn.core.test import box_results_with_nms_and_limit
    from maskrcnn.modeling.roi_heads.roi_heads import ROIHeads
    from maskrcnn.ops.box_voting import BoxVoting

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body", "MODEL.MASK_ON", False,
                         "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "TEST.BBOX_VOTE.ENABLED", True,
                         "TEST.BBOX_VOTE.VOTE_TH", 0.7, "TEST.BBOX_VOTE.SCORING_METHOD", "AVG", "TEST.NMS", 0.5])
    assert_and_infer_cfg(cfg)
    heads = ROIHeads.from_cfg(cfg, 64, [0.25, 0.125, 0.0625, 0.03125])
    assert heads.box_voting == BoxVoting(0.7, "AVG", 1.0, legacy_plus_one=False)
    probs, boxes = _voting_inputs()
    pad = torch.zeros(3, 4 * (cfg.MODEL.NUM_CLASSES - 2))  # the default config has 81 classes
    probs81 = torch.cat([probs, torch.zeros(3, cfg.MODEL.NUM_CLASSES - 2)], 1)
    scores, det_boxes, _ = box_results_with_nms_and_limit(probs81.numpy(), torch.cat([boxes, pad], 1).numpy(), cfg)
    np.testing.assert_allclose(scores, [0.75, 0.7], rtol=1e-6)
    np.testing.assert_allclose(det_boxes[0], [0.4, 0.0, 10.4, 10.0], rtol=1e-6)
