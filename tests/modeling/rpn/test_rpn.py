import torch
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead as TVRPNHead
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler
from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.modeling.rpn.head import RPNHead
from maskrcnn.modeling.rpn.loss import assign_anchor_labels, rpn_losses
from maskrcnn.modeling.rpn.rpn import RPN

SIZES = ((32,), (64,), (128,))
RATIOS = ((0.5, 1.0, 2.0),) * 3


def _pair(pre=200, post=50):
    tv_head = TVRPNHead(16, 3)
    with torch.no_grad():
        for p in tv_head.parameters():
            p.normal_(0, 0.3)
    tv = RegionProposalNetwork(TVAnchorGenerator(SIZES, RATIOS), tv_head, 0.7, 0.3, 256, 0.5,
                               dict(training=pre, testing=pre), dict(training=post, testing=post), 0.7)
    head = RPNHead(16, 3)
    head.RPN_conv.load_state_dict(tv_head.conv[0][0].state_dict())
    head.RPN_cls_score.load_state_dict(tv_head.cls_logits.state_dict())
    head.RPN_bbox_pred.load_state_dict(tv_head.bbox_pred.state_dict())
    ours = RPN(AnchorGenerator(SIZES, RATIOS), head, BoxCoder(), Matcher(0.7, 0.3, True),
               BalancedPositiveNegativeSampler(256, 0.5), pre, post, 0.7, 1e-3)
    return tv, ours


def _inputs():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 16, 24 // s, 32 // s, generator=g) for s in (1, 2, 4)]
    sizes = [(90, 128), (96, 110)]
    return feats, sizes


def test_head_equals_torchvision():
    tv, ours = _pair()
    feats, _ = _inputs()
    a, b = ours.head(feats)
    c, d = tv.head(feats)
    for x, y in zip(a + b, c + d):
        torch.testing.assert_close(x, y)
    assert ours.RPN_conv is ours.head.RPN_conv


def test_eval_proposals_equal_torchvision_and_limits():
    tv, ours = _pair(pre=200, post=50)
    tv.eval(), ours.eval()
    feats, sizes = _inputs()
    with torch.no_grad():
        got, _ = ours(feats, sizes, batch_shape=(96, 128))
        ref, _ = tv(TVImageList(torch.zeros(2, 3, 96, 128), sizes), {str(i): f for i, f in enumerate(feats)})
    for a, b, (h, w) in zip(got, ref, sizes):
        assert a.shape[0] <= 50
        torch.testing.assert_close(a, b)
        assert (a[:, 2] <= w).all() and (a[:, 3] <= h).all()


def test_generate_proposals_module_detectron_signature():
    _, ours = _pair(pre=100, post=20)
    ours.eval()
    feats, sizes = _inputs()
    with torch.no_grad():
        logits, deltas = ours.head(feats)
        rois, probs = ours.RPN_GenerateProposals([torch.sigmoid(x) for x in logits], deltas,
                                                 torch.tensor([[90.0, 128, 1.0], [96, 110, 1.0]]),
                                                 batch_shape=(96, 128))
        ref, _ = ours(feats, sizes, batch_shape=(96, 128))
    assert rois.shape[1] == 5 and probs.shape == (rois.shape[0],)
    torch.testing.assert_close(rois[rois[:, 0] == 0, 1:], ref[0])
    torch.testing.assert_close(rois[rois[:, 0] == 1, 1:], ref[1])
    assert ((probs >= 0) & (probs <= 1)).all()


def test_losses_equal_torchvision_with_same_sampling():
    tv, ours = _pair()
    tv.train(), ours.train()
    feats, sizes = _inputs()
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [60, 20, 100, 80]])},
               {"boxes": torch.tensor([[5.0, 30, 70, 90]])}]
    torch.manual_seed(7)
    _, tv_losses = tv(TVImageList(torch.zeros(2, 3, 96, 128), sizes), {str(i): f for i, f in enumerate(feats)},
                      [dict(t) for t in targets])
    torch.manual_seed(7)
    _, losses = ours(feats, sizes, targets, batch_shape=(96, 128))
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_bbox"], tv_losses["loss_rpn_box_reg"])
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    assert all(p.grad is not None for p in ours.head.parameters())


def test_hand_built_loss_perfect_anchor_gives_zero_box_loss():
    anchors = [torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])]
    gt = [torch.tensor([[0.0, 0, 10, 10]])]
    logits = [torch.tensor([[[[0.0]], [[0.0]]]]).reshape(1, 2, 1, 1)]
    deltas = [torch.zeros(1, 8, 1, 1, requires_grad=True)]
    out = rpn_losses(logits, deltas, anchors, gt, [(64, 64)], Matcher(0.7, 0.3, True),
                     BalancedPositiveNegativeSampler(256, 0.5), BoxCoder())
    assert out["loss_rpn_bbox"].item() == 0.0
    # two sampled anchors, both logits 0: BCE = log(2) whatever the label
    assert abs(out["loss_rpn_cls"].item() - 0.6931472) < 1e-6


def test_empty_gt_all_negative_and_crowd_and_straddle_ignored():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [-30, -30, 5, 5]])
    labels, _ = assign_anchor_labels(anchors, torch.zeros(0, 4), (64, 64), Matcher(0.7, 0.3, True))
    assert labels.tolist() == [0, 0, 0]
    labels, _ = assign_anchor_labels(anchors, torch.zeros(0, 4), (64, 64), Matcher(0.7, 0.3, True),
                                     straddle_thresh=0, crowd_boxes=torch.tensor([[18.0, 18, 45, 45]]))
    assert labels.tolist() == [0, -1, -1]
