import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.modeling.rpn.proposals import (GenerateProposals, flatten_level_outputs, generate_proposals,
                                             padded_batch_shape)
from maskrcnn.ops.box_coder import BoxCoder

GRIDS = [(8, 10), (4, 5), (2, 3)]
SIZES = [(60, 75), (64, 80)]


def _inputs(seed=0, num_images=2, a=3):
    g = torch.Generator().manual_seed(seed)
    total = num_images * a * sum(h * w for h, w in GRIDS)
    # Distinct, well-separated logits: top-k and NMS order cannot depend on float noise.
    flat = torch.randperm(total, generator=g).float() / total * 12 - 6
    objectness, deltas, offset = [], [], 0
    for h, w in GRIDS:
        n = num_images * a * h * w
        objectness.append(flat[offset:offset + n].reshape(num_images, a, h, w))
        deltas.append(torch.randn(num_images, 4 * a, h, w, generator=g) * 0.5)
        offset += n
    gen = AnchorGenerator(((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3, strides=[8, 16, 32])
    anchors = gen(objectness)
    return objectness, deltas, anchors


def _torchvision(objectness, deltas, anchors, sizes, pre, post, nms, min_size, score_thresh):
    tv = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, dict(training=pre, testing=pre),
                               dict(training=post, testing=post), nms, score_thresh=score_thresh)
    tv.eval()
    tv.min_size = min_size
    num_images = objectness[0].shape[0]
    obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
    all_anchors = torch.cat(anchors)
    proposals = tv.box_coder.decode(deltas_flat.detach(), [all_anchors] * num_images).view(num_images, -1, 4)
    counts = [o[0].numel() for o in objectness]
    return tv.filter_proposals(proposals, obj_flat, sizes, counts)


@pytest.mark.parametrize("pre,post,nms,min_size,score_thresh", [
    (1000, 1000, 0.7, 1e-3, 0.0),  # torchvision's test settings (pre >= every level: no top-k cut)
    (20, 15, 0.5, 4.0, 0.3),
    (5, 100, 0.9, 0.0, 0.0),
])
def test_equal_to_torchvision_filter_proposals(pre, post, nms, min_size, score_thresh):
    objectness, deltas, anchors = _inputs()
    boxes, scores = generate_proposals(objectness, deltas, anchors, SIZES, pre, post, nms, min_size, BoxCoder(),
                                       score_thresh)
    ref_boxes, ref_scores = _torchvision(objectness, deltas, anchors, SIZES, pre, post, nms, min_size, score_thresh)
    assert len(boxes) == 2
    for b, s, rb, rs in zip(boxes, scores, ref_boxes, ref_scores):
        assert b.shape[0] > 0
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
        torch.testing.assert_close(s, rs, rtol=0, atol=0)


def test_limits_clipping_and_order():
    objectness, deltas, anchors = _inputs(seed=1)
    deltas = [d * 4 for d in deltas]  # many boxes leave the image
    boxes, scores = generate_proposals(objectness, deltas, anchors, SIZES, 4, 7, 0.99, 0.0, BoxCoder())
    for b, s, (h, w) in zip(boxes, scores, SIZES):
        assert 0 < b.shape[0] <= 7
        assert (b[:, 0::2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (s[:-1] >= s[1:]).all() and ((s > 0) & (s < 1)).all()
        assert not b.requires_grad
    # at most pre_nms_top_n per level survive into NMS
    boxes, _ = generate_proposals(objectness, deltas, anchors, SIZES, 2, 1000, 1.0, 0.0, BoxCoder())
    assert all(b.shape[0] <= 2 * len(GRIDS) for b in boxes)
    boxes, _ = generate_proposals(objectness, deltas, anchors, SIZES, 1000, 0, 0.7, 0.0, BoxCoder())
    assert all(b.shape == (0, 4) for b in boxes)


def test_outputs_are_detached():
    objectness, deltas, anchors = _inputs()
    objectness = [o.requires_grad_() for o in objectness]
    boxes, scores = generate_proposals(objectness, deltas, anchors, SIZES, 50, 50, 0.7, 0.0, BoxCoder())
    assert not boxes[0].requires_grad and not scores[0].requires_grad


def test_legacy_plus_one_clip_and_nms():
    # Two anchors as proposals (zero deltas decode to the anchors themselves in both conventions).
    anchors = [torch.tensor([[0.0, 0, 9, 9], [1, 0, 10, 9]])]
    objectness = [torch.tensor([2.0, 1.0]).reshape(1, 1, 1, 2)]
    deltas = [torch.zeros(1, 4, 1, 2)]
    # IoU 72 / 90 = 0.8 with continuous widths, 90 / 110 = 0.818 with inclusive ones.
    boxes, _ = generate_proposals(objectness, deltas, anchors, [(20, 20)], 10, 10, 0.81, 0.0, BoxCoder())
    assert boxes[0].shape[0] == 2
    boxes, _ = generate_proposals(objectness, deltas, anchors, [(20, 20)], 10, 10, 0.81, 0.0,
                                  BoxCoder(legacy_plus_one=True))
    assert boxes[0].tolist() == [[0.0, 0, 9, 9]]
    # clipping to the last pixel (w - 1) and the size filter with +1 widths
    anchors = [torch.tensor([[-5.0, -5, 30, 30], [3, 3, 3, 3]])]
    for legacy, limit, kept in ((True, 19.0, 2), (False, 20.0, 1)):
        boxes, _ = generate_proposals(objectness, deltas, anchors, [(20, 20)], 10, 10, 0.7, 1.0,
                                      BoxCoder(legacy_plus_one=legacy))
        assert boxes[0][0].tolist() == [0.0, 0.0, limit, limit] and boxes[0].shape[0] == kept


def test_flatten_order_matches_torchvision():
    objectness, deltas, _ = _inputs()
    scores, boxes, counts = flatten_level_outputs(objectness, deltas)
    ref_scores, ref_boxes = concat_box_prediction_layers(objectness, deltas)
    assert counts == [3 * h * w for h, w in GRIDS]
    assert torch.equal(scores.reshape(-1), ref_scores.reshape(-1))
    assert torch.equal(boxes.reshape(-1, 4), ref_boxes)


def test_bad_inputs():
    objectness, deltas, anchors = _inputs()
    with pytest.raises(ValueError, match="anchors"):
        generate_proposals(objectness, deltas, anchors[:2], SIZES, 10, 10, 0.7, 0.0, BoxCoder())
    with pytest.raises(ValueError, match="image_sizes"):
        generate_proposals(objectness, deltas, anchors, SIZES[:1], 10, 10, 0.7, 0.0, BoxCoder())
    with pytest.raises(ValueError, match="deltas"):
        generate_proposals(objectness, [d[:, :4] for d in deltas], anchors, SIZES, 10, 10, 0.7, 0.0, BoxCoder())
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        generate_proposals(objectness, deltas, anchors, SIZES, 0, 10, 0.7, 0.0, BoxCoder())


def _module(anchor_generator, pre, post):
    return GenerateProposals(anchor_generator, BoxCoder(), pre, post, dict(training=0.7, testing=0.6), 0.0)


def test_generate_proposals_module_detectron_signature():
    objectness, deltas, _ = _inputs()
    gen = AnchorGenerator(((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3, strides=[8, 16, 32])
    module = _module(gen, dict(training=30, testing=8), dict(training=25, testing=6))
    im_info = torch.tensor([[60.0, 75, 1.5], [64, 80, 1.5]])
    for training, (pre, post, nms) in ((True, (30, 25, 0.7)), (False, (8, 6, 0.6))):
        module.train(training)
        rois, probs = module([torch.sigmoid(o) for o in objectness], deltas, im_info)
        ref_boxes, ref_scores = generate_proposals(objectness, deltas, gen(objectness), SIZES, pre, post, nms, 0.0,
                                                   BoxCoder())
        assert rois.shape == (sum(b.shape[0] for b in ref_boxes), 5) and probs.shape == (rois.shape[0],)
        for i, (b, s) in enumerate(zip(ref_boxes, ref_scores)):
            mine = rois[:, 0] == i
            assert 0 < int(mine.sum()) <= post
            torch.testing.assert_close(rois[mine, 1:], b)
            torch.testing.assert_close(probs[mine], s)
        assert torch.equal(rois[:, 0], rois[:, 0].sort().values)  # images in order


def test_generate_proposals_module_single_level_and_inferred_strides():
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(1, 15, 4, 6, generator=g)
    bbox = torch.randn(1, 60, 4, 6, generator=g) * 0.2
    c4 = AnchorGenerator([(32, 64, 128, 256, 512)], [(0.5, 1.0, 2.0)], strides=[16])
    rois, probs = _module(c4, 100, 10).eval()(prob, bbox, [[64.0, 96.0, 1.0]])
    ref, ref_s = generate_proposals([torch.logit(prob.double()).float()], [bbox], c4([prob]), [(64, 96)], 100, 10,
                                    0.6, 0.0, BoxCoder())
    assert rois.shape[0] == ref[0].shape[0] <= 10 and (rois[:, 0] == 0).all()
    torch.testing.assert_close(rois[:, 1:], ref[0])
    torch.testing.assert_close(probs, ref_s[0])
    # strides inferred from the padded batch: the im_info sizes are padded up to a multiple of 32 (64 x 96)
    inferred = AnchorGenerator([(32, 64, 128, 256, 512)], [(0.5, 1.0, 2.0)], strides=None)
    rois2, probs2 = _module(inferred, 100, 10).eval()(prob, bbox, torch.tensor([[60.0, 70.0, 1.0]]))
    rois3, probs3 = _module(c4, 100, 10).eval()(prob, bbox, torch.tensor([[60.0, 70.0, 1.0]]))
    assert (rois2[:, 3] <= 70).all() and (rois2[:, 4] <= 60).all()
    torch.testing.assert_close(rois2, rois3)
    torch.testing.assert_close(probs2, probs3)
    with pytest.raises(ValueError, match="im_info"):
        _module(c4, 100, 10)(prob, bbox, torch.tensor([60.0, 70.0, 1.0]))


def test_padded_batch_shape_and_mode_dicts():
    assert padded_batch_shape([(60, 70), (33, 100)]) == (64, 128)
    assert padded_batch_shape([(64, 96)], 1) == (64, 96)
    with pytest.raises(ValueError, match="testing"):
        GenerateProposals(None, BoxCoder(), dict(training=1), 1)


def _two_levels(logits, anchors):
    """One anchor per level (A = 1 on a 1x1 grid), zero deltas: the proposals are the clipped anchors."""
    objectness = [torch.tensor([v]).view(1, 1, 1, 1) for v in logits]
    deltas = [torch.zeros(1, 4, 1, 1) for _ in logits]
    return objectness, deltas, [torch.tensor([a]) for a in anchors]


def test_nms_on_logits_ranks_what_probabilities_tie():
    # sigmoid(18) and sigmoid(25) are both 1.0 in float32: ranked by probability the two tie and the first level's
    # box comes first; detectron2 ranks by logit, so the second level's box (logit 25) is the best proposal.
    assert torch.sigmoid(torch.tensor(18.0)) == torch.sigmoid(torch.tensor(25.0)) == 1.0
    objectness, deltas, anchors = _two_levels([18.0, 25.0], [[0.0, 0, 10, 10], [20.0, 20, 40, 40]])
    args = (objectness, deltas, anchors, [(50, 50)], 10, 1, 0.7, 0.0, BoxCoder())
    boxes, scores = generate_proposals(*args, nms_on_logits=True)
    assert boxes[0].tolist() == [[20.0, 20, 40, 40]] and scores[0].tolist() == [1.0]
    boxes, logits = generate_proposals(*args, nms_on_logits=True, return_logits=True)
    assert boxes[0].tolist() == [[20.0, 20, 40, 40]] and logits[0].tolist() == [25.0]
    boxes, _ = generate_proposals(*args)
    assert boxes[0].tolist() == [[0.0, 0, 10, 10]]  # torchvision's rule: the tie goes to the first
    # Below saturation both rules agree; logits are returned in the same order as the probabilities.
    objectness, deltas, anchors = _two_levels([1.0, 3.0], [[0.0, 0, 10, 10], [20.0, 20, 40, 40]])
    b1, p = generate_proposals(objectness, deltas, anchors, [(50, 50)], 10, 2, 0.7, 0.0, BoxCoder())
    b2, lg = generate_proposals(objectness, deltas, anchors, [(50, 50)], 10, 2, 0.7, 0.0, BoxCoder(),
                                nms_on_logits=True, return_logits=True)
    assert torch.equal(b1[0], b2[0]) and lg[0].tolist() == [3.0, 1.0]
    torch.testing.assert_close(p[0], torch.sigmoid(lg[0]))
    with pytest.raises(ValueError, match="scores_are_probs"):
        generate_proposals(objectness, deltas, anchors, [(50, 50)], 10, 2, 0.7, 0.0, BoxCoder(),
                           scores_are_probs=True, nms_on_logits=True)


def test_min_size_strict_drops_empty_proposals():
    # The second anchor lies right of the 50-pixel-wide image: clipped, it is the empty box [50, 0, 50, 10].
    objectness, deltas, anchors = _two_levels([2.0, 1.0], [[0.0, 0, 10, 10], [60.0, 0, 70, 10]])
    args = (objectness, deltas, anchors, [(50, 50)], 10, 10, 0.7, 0.0, BoxCoder())
    boxes, _ = generate_proposals(*args)  # torchvision: width >= 0 is kept
    assert boxes[0].tolist() == [[0.0, 0, 10, 10], [50.0, 0, 50, 10]]
    boxes, _ = generate_proposals(*args, min_size_strict=True)  # detectron2: Boxes.nonempty(threshold=0)
    assert boxes[0].tolist() == [[0.0, 0, 10, 10]]
    module = GenerateProposals(None, BoxCoder(), 10, 10, 0.7, 0.0, min_size_strict=True)
    assert module.min_size_strict
