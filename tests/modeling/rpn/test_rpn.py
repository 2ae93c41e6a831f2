import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.rpn.anchors import AnchorGenerator
from maskrcnn.modeling.rpn.head import RPNHead
from maskrcnn.modeling.rpn.proposals import GenerateProposals
from maskrcnn.modeling.rpn.rpn import RPN
from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler

# torchvision's FPN RPN: five levels, one size each, three ratios; strides inferred from the padded batch.
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
BATCH = (96, 128)
IMAGE_SIZES = [(90, 128), (96, 110)]
PRE = dict(training=300, testing=1000)
POST = dict(training=200, testing=1000)


def _pair(channels=8, pre=PRE, post=POST):
    tv_head = TVRPNHead(channels, 3)
    with torch.no_grad():
        for p in tv_head.parameters():
            p.normal_(0, 0.3)
        tv_head.cls_logits.weight.mul_(4.0)  # well-separated objectness
    tv = RegionProposalNetwork(TVAnchorGenerator(SIZES, RATIOS), tv_head, 0.7, 0.3, 256, 0.5, pre, post, 0.7)
    head = RPNHead(channels, 3)
    head.RPN_conv.load_state_dict(tv_head.conv[0][0].state_dict())
    head.RPN_cls_score.load_state_dict(tv_head.cls_logits.state_dict())
    head.RPN_bbox_pred.load_state_dict(tv_head.bbox_pred.state_dict())
    ours = RPN(AnchorGenerator(SIZES, RATIOS, strides=None), head, BoxCoder(), Matcher(0.7, 0.3, True),
               BalancedPositiveNegativeSampler(256, 0.5), pre, post, nms_thresh=0.7, min_size=1e-3)
    return tv, ours


def _features(channels=8):
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]  # P6 = max-pool(P5, 1, stride 2)
    return [torch.randn(2, channels, h, w, generator=g) for h, w in shapes]


def _tv_inputs(feats):
    return TVImageList(torch.zeros(2, 3, *BATCH), IMAGE_SIZES), {str(i): f for i, f in enumerate(feats)}


TARGETS = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [60, 20, 100, 80], [0, 0, 120, 88]])},
           {"boxes": torch.tensor([[5.0, 30, 70, 90]])}]


@pytest.mark.parametrize("batch_shape", [BATCH, None])
def test_eval_proposals_identical_to_torchvision(batch_shape):
    tv, ours = _pair()
    tv.eval(), ours.eval()
    feats = _features()
    with torch.no_grad():
        got, losses = ours(feats, IMAGE_SIZES, batch_shape=batch_shape)
        ref, _ = tv(*_tv_inputs(feats))
    assert losses == {}
    for a, b, (h, w) in zip(got, ref, IMAGE_SIZES):
        assert 100 < a.shape[0] <= 1000
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a[:, 2] <= w).all() and (a[:, 3] <= h).all()


def test_training_losses_and_proposals_equal_torchvision_and_reach_the_head():
    tv, ours = _pair()
    tv.train(), ours.train()
    feats = _features()
    torch.manual_seed(7)
    tv_props, tv_losses = tv(*_tv_inputs(feats), [dict(t) for t in TARGETS])
    torch.manual_seed(7)
    props, losses = ours(feats, IMAGE_SIZES, TARGETS, batch_shape=BATCH)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    for a, b in zip(props, tv_props):
        assert a.shape[0] <= POST["training"] and not a.requires_grad
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"], rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["loss_rpn_bbox"], tv_losses["loss_rpn_box_reg"], rtol=1e-6, atol=0)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    for name, p in ours.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_proposal_limits_follow_the_mode():
    _, ours = _pair(pre=dict(training=4, testing=2), post=dict(training=9, testing=5))
    feats = _features()
    ours.train()
    props, _ = ours(feats, IMAGE_SIZES, TARGETS)
    assert all(0 < p.shape[0] <= 9 for p in props)
    ours.eval()
    with torch.no_grad():
        props, _ = ours(feats, IMAGE_SIZES)
    assert all(0 < p.shape[0] <= 5 for p in props)
    _, ours = _pair(pre=dict(training=2, testing=2), post=dict(training=1000, testing=1000))
    ours.eval()
    with torch.no_grad():
        props, _ = ours(feats, IMAGE_SIZES)
    assert all(p.shape[0] <= 2 * 5 for p in props)  # pre_nms_top_n is per level


def test_empty_gt_image_and_crowd_boxes_in_training():
    _, ours = _pair()
    ours.train()
    targets = [{"boxes": torch.zeros(0, 4)},
               {"boxes": torch.tensor([[5.0, 30, 70, 90]]), "crowd_boxes": torch.tensor([[70.0, 0, 110, 40]])}]
    _, losses = ours(_features(), IMAGE_SIZES, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_bbox"] > 0
    _, losses = ours(_features(), IMAGE_SIZES, [{"boxes": torch.zeros(0, 4)}] * 2)
    assert losses["loss_rpn_bbox"].item() == 0.0 and torch.isfinite(losses["loss_rpn_cls"])
    with pytest.raises(ValueError, match="targets"):
        ours(_features(), IMAGE_SIZES)
    with pytest.raises(ValueError, match="boxes"):
        ours(_features(), IMAGE_SIZES, [{}, {}])


def test_detectron_names_and_generate_proposals_submodule():
    _, ours = _pair()
    assert ours.RPN_conv is ours.head.RPN_conv and ours.RPN_cls_score is ours.head.RPN_cls_score
    assert ours.RPN_bbox_pred is ours.head.RPN_bbox_pred
    x = _features()[0]
    torch.testing.assert_close(ours.RPN_cls_score(torch.relu(ours.RPN_conv(x))), ours.head(x)[0][0])
    gp = ours.RPN_GenerateProposals
    assert isinstance(gp, GenerateProposals)
    assert gp.anchor_generator is ours.anchor_generator and gp.box_coder is ours.box_coder
    assert set(ours.state_dict()) == {f"head.{n}.{w}" for n in ("RPN_conv", "RPN_cls_score", "RPN_bbox_pred")
                                      for w in ("weight", "bias")}
    ours.eval()
    feats = _features()
    with torch.no_grad():
        logits, deltas = ours.head(feats)
        im_info = torch.tensor([[h, w, 1.0] for h, w in IMAGE_SIZES])
        rois, probs = gp([torch.sigmoid(o) for o in logits], deltas, im_info, batch_shape=BATCH)
        ref, _ = ours(feats, IMAGE_SIZES, batch_shape=BATCH)
    for i in range(2):
        torch.testing.assert_close(rois[rois[:, 0] == i, 1:], ref[i])


def test_from_cfg_c4_defaults():
    cfg = get_cfg()
    assert_and_infer_cfg(cfg, make_immutable=False)
    rpn = RPN.from_cfg(cfg, 32)
    assert rpn.anchor_generator.strides == [16] and rpn.anchor_generator.num_anchors_per_location() == [15]
    assert rpn.RPN_conv.in_channels == rpn.RPN_conv.out_channels == 32 and rpn.RPN_cls_score.out_channels == 15
    assert rpn.pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert rpn.post_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn.nms_thresh == {"training": 0.7, "testing": 0.7} and rpn.min_size == {"training": 0.0, "testing": 0.0}
    assert (rpn.matcher.high_threshold, rpn.matcher.low_threshold) == (0.7, 0.3)
    assert rpn.matcher.allow_low_quality_matches
    assert (rpn.sampler.batch_size_per_image, rpn.sampler.positive_fraction) == (256, 0.5)
    assert rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0) and not rpn.box_coder.legacy_plus_one
    assert rpn.straddle_thresh == -1 and rpn.crowd_thresh == 0.7
    rpn.eval()
    with torch.no_grad():
        props, losses = rpn(torch.randn(1, 32, 4, 6), [(64, 96)])  # a single tensor: the C4 level
    assert len(props) == 1 and props[0].shape[1] == 4 and losses == {}


def test_from_cfg_fpn_legacy_and_head_dim():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FAST_RCNN.ROI_BOX_HEAD",
                         "fast_rcnn_heads.roi_2mlp_head", "MRCNN.ROI_MASK_HEAD",
                         "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs", "MODEL.LEGACY_PLUS_ONE", "True",
                         "RPN.HEAD_DIM", "24", "TRAIN.RPN_STRADDLE_THRESH", "0", "TEST.RPN_NMS_THRESH", "0.6",
                         "TRAIN.RPN_BATCH_SIZE_PER_IM", "128"])
    assert_and_infer_cfg(cfg, make_immutable=False)
    rpn = RPN.from_cfg(cfg, 16)
    assert rpn.anchor_generator.strides == [4, 8, 16, 32, 64] and rpn.anchor_generator.legacy_plus_one
    assert rpn.box_coder.legacy_plus_one and rpn.RPN_conv.out_channels == 24 and rpn.RPN_cls_score.out_channels == 3
    assert rpn.nms_thresh == {"training": 0.7, "testing": 0.6} and rpn.straddle_thresh == 0
    assert rpn.sampler.batch_size_per_image == 128
    rpn.train()
    feats = [torch.randn(1, 16, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    props, losses = rpn(feats, [(60, 64)], [{"boxes": torch.tensor([[4.0, 4, 40, 30]])}])
    assert (props[0][:, 2] <= 63).all() and (props[0][:, 3] <= 59).all()  # legacy clip to the last pixel
    assert all(torch.isfinite(v) for v in losses.values())


def test_from_cfg_detectron2_proposal_rules():
    cfg = get_cfg()
    assert_and_infer_cfg(cfg, make_immutable=False)
    rpn = RPN.from_cfg(cfg, 8)
    assert not rpn.min_size_strict and not rpn.nms_on_logits and not rpn.RPN_GenerateProposals.min_size_strict
    cfg.merge_from_list(["RPN.MIN_SIZE_STRICT", "True", "RPN.NMS_ON_LOGITS", "True", "SIZE_DIVISIBILITY", "0"])
    rpn = RPN.from_cfg(cfg, 8)
    assert rpn.min_size_strict and rpn.nms_on_logits and rpn.RPN_GenerateProposals.min_size_strict
    assert rpn.size_divisibility == 0
