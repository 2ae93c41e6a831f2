"""ROIHeads alone on tiny inputs: the training losses, the inference outputs, the C4 res5 sharing and the contract's
errors. (That its inference equals the former Generalized_RCNN path is what the model-level, torchvision and
Detectron-walkthrough tests check.)"""
import contextlib

import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.roi_heads.box_head import ResNetRoIConv5Head, Roi2MLPHead
from maskrcnn.modeling.roi_heads.box_outputs import FastRCNNOutputs
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNFCNHead, MaskRCNNHeadV0UpShare
from maskrcnn.modeling.roi_heads.mask_outputs import MaskRCNNOutputs
from maskrcnn.modeling.roi_heads.roi_heads import ROIHeads
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler

SIZES = [(64, 64), (56, 48)]  # network-input sizes of the two images, padded to 64 x 64
K1 = 4  # 3 classes + background
C = 8


def _fpn_features():
    return [torch.randn(2, C, 16, 16), torch.randn(2, C, 8, 8)]  # strides 4 and 8


def _c4_features():
    return torch.randn(2, C, 4, 4)  # stride 16


def _proposals(n=12):
    out = []
    for h, w in SIZES:
        xy = torch.rand(n, 2) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2) * torch.tensor([w * 0.4, h * 0.4]) + 6
        out.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1))
    return out


def _targets(mask=True):
    out = []
    for h, w in SIZES:
        boxes = torch.tensor([[4.0, 6, 30, 28], [20, 10, 44, 50]])
        t = {"boxes": boxes, "labels": torch.tensor([1, 3])}
        if mask:
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            masks[0, 6:28, 4:30] = 1
            masks[1, 10:50, 20:44] = 1
            t["masks"] = masks
        out.append(t)
    return out


def fpn_heads(mask=True, **kwargs):
    box_head = Roi2MLPHead(C, [1 / 4, 1 / 8], resolution=4, sampling_ratio=2, mlp_dim=16)
    mask_head = MaskRCNNFCNHead(C, [1 / 4, 1 / 8], resolution=7, sampling_ratio=2, num_convs=1, dim=8) if mask else None
    return ROIHeads(box_head, FastRCNNOutputs(16, K1), fg_bg_sampler=BalancedPositiveNegativeSampler(16, 0.25),
                    mask_head=mask_head, mask_outs=MaskRCNNOutputs(8, K1) if mask else None, mask_resolution=14,
                    score_thresh=0.0, **kwargs)


def c4_heads():
    box_head = ResNetRoIConv5Head(C, resolution=14, sampling_ratio=2, width_per_group=2, num_blocks=1,
                                  out_channels=16)
    return ROIHeads(box_head, FastRCNNOutputs(16, K1), fg_bg_sampler=BalancedPositiveNegativeSampler(16, 0.25),
                    mask_head=MaskRCNNHeadV0UpShare(16, 8), mask_outs=MaskRCNNOutputs(8, K1), mask_resolution=14,
                    score_thresh=0.0)


@pytest.mark.parametrize("build,features", [(fpn_heads, _fpn_features), (c4_heads, _c4_features)])
def test_training_losses_are_finite_and_reach_every_parameter(build, features):
    heads = build().train()
    results, losses = heads(features(), _proposals(), SIZES, _targets())
    assert results == [] and set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    assert losses["loss_bbox"] > 0  # the appended ground truth is always a foreground RoI
    sum(losses.values()).backward()
    missing = [n for n, p in heads.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_training_box_and_mask_poolers_pack_the_levels_once_with_the_same_gradients(monkeypatch):
    """A training forward packs the FPN levels into RoIAlign's table once for the box and mask poolers, as
    inference does; losses and the features' gradients are those of packing per pooler."""
    import importlib

    ra = importlib.import_module("maskrcnn.ops.roi_align")
    rh = importlib.import_module("maskrcnn.modeling.roi_heads.roi_heads")
    packs = []
    real = ra.pack_features
    # Only the FPN levels: the mask targets are pooled from the ground-truth masks too, a table of their own.
    monkeypatch.setattr(ra, "pack_features", lambda f, dtype, extra_rows=0: (len(f) == 2 and packs.append(1))
                        or real(f, dtype, extra_rows))
    torch.manual_seed(0)
    heads = fpn_heads().train()
    features, proposals = _fpn_features(), _proposals()

    def step():
        feats = [f.clone().requires_grad_() for f in features]
        torch.manual_seed(1)  # the same sampled RoIs
        _, losses = heads(feats, proposals, SIZES, _targets())
        sum(losses.values()).backward()
        return losses, [f.grad for f in feats]

    losses, grads = step()
    assert len(packs) == 1
    packs.clear()
    monkeypatch.setattr(rh, "shared_feature_tables", contextlib.nullcontext)
    ref_losses, ref_grads = step()
    assert len(packs) == 2
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_faster_rcnn_heads_have_no_mask_loss_and_mask_loss_weight_scales():
    heads = fpn_heads(mask=False).train()
    assert not heads.mask_on and heads.Mask_Head is None and heads.Mask_Outs is None
    _, losses = heads(_fpn_features(), _proposals(), SIZES, _targets(mask=False))
    assert set(losses) == {"loss_cls", "loss_bbox"}

    feats, props, targets = _fpn_features(), _proposals(), _targets()
    one = fpn_heads().train()
    two = fpn_heads(mask_loss_weight=2.0).train()
    two.load_state_dict(one.state_dict())
    torch.manual_seed(3)
    _, l1 = one(feats, props, SIZES, targets)
    torch.manual_seed(3)
    _, l2 = two(feats, props, SIZES, targets)
    torch.testing.assert_close(l2["loss_mask"], 2 * l1["loss_mask"])
    torch.testing.assert_close(l2["loss_cls"], l1["loss_cls"])


def test_mask_dice_weight_adds_a_dice_term_to_the_mask_loss():
    feats, props, targets = _fpn_features(), _proposals(), _targets()
    heads = {w: fpn_heads(mask_dice_weight=w).train() for w in (0.0, 1.0, 2.0)}
    for h in heads.values():
        h.load_state_dict(heads[0.0].state_dict())
    losses = {}
    for w, h in heads.items():
        torch.manual_seed(3)
        losses[w] = h(feats, props, SIZES, targets)[1]["loss_mask"]
    dice = losses[1.0] - losses[0.0]
    assert 0.0 < dice.item() <= 1.0
    torch.testing.assert_close(losses[2.0] - losses[0.0], 2 * dice)
    with pytest.raises(ValueError, match="mask_dice_weight"):
        fpn_heads(mask_dice_weight=-1.0)


@pytest.mark.parametrize("build,features", [(fpn_heads, _fpn_features), (c4_heads, _c4_features)])
def test_inference_outputs(build, features):
    heads = build().eval()
    with torch.no_grad():
        results, losses = heads(features(), _proposals(), SIZES)
    assert losses == {} and len(results) == 2
    for det, (h, w) in zip(results, SIZES):
        n = det["boxes"].shape[0]
        assert 0 < n <= heads.detections_per_img
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].dtype == torch.int64
        assert det["masks"].shape == (n, 1, 14, 14) and det["masks"].dtype == torch.float32
        assert det["labels"].min() >= 1 and det["labels"].max() <= K1 - 1
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["masks"].min() >= 0 and det["masks"].max() <= 1


def test_inference_pieces_compose_to_forward():
    heads = fpn_heads(detections_per_img=5).eval()
    feats, props = _fpn_features(), _proposals()
    with torch.no_grad():
        results, _ = heads(feats, props, SIZES)
        probs, boxes = heads.predict_boxes(feats, props, SIZES)
        assert [p.shape for p in probs] == [(12, K1)] * 2 and [b.shape for b in boxes] == [(12, 4 * K1)] * 2
        torch.testing.assert_close(probs[0].sum(1), torch.ones(12))
        det_boxes, det_scores, det_labels = heads.postprocess_detections(probs, boxes)
        all_masks = heads.mask_probs(feats, det_boxes)
    for r, b, s, lab, m in zip(results, det_boxes, det_scores, det_labels, all_masks):
        assert b.shape[0] == 5 and torch.equal(r["boxes"], b) and torch.equal(r["scores"], s)
        assert torch.equal(r["labels"], lab)
        assert m.shape == (5, K1, 14, 14)
        torch.testing.assert_close(r["masks"][:, 0], m[torch.arange(5), lab])


def test_bbox_reg_off_keeps_the_rois():
    heads = fpn_heads(bbox_reg=False).eval()
    props = _proposals()
    with torch.no_grad():
        _, boxes = heads.predict_boxes(_fpn_features(), props, SIZES)
    for b, p in zip(boxes, props):
        assert torch.equal(b, p.repeat(1, K1))


def test_c4_mask_head_reuses_the_box_heads_res5_on_foreground_rois():
    heads = c4_heads().train()
    box_calls, mask_inputs = [], []
    heads.Box_Head.register_forward_hook(lambda m, args, out: box_calls.append(out))
    heads.Mask_Head.register_forward_hook(lambda m, args, out: mask_inputs.append(args[0]))
    sampled = []
    select = heads.select_training_samples

    def recording_select(*args):
        sampled.append(select(*args))
        return sampled[-1]

    heads.select_training_samples = recording_select
    heads(_c4_features(), _proposals(), SIZES, _targets())
    assert len(box_calls) == 1 and isinstance(box_calls[0], tuple)  # one res5 pass serves both heads
    fg = torch.cat(sampled[0].labels) > 0
    assert fg.any() and torch.equal(mask_inputs[0], box_calls[0][1][fg])

    heads.eval()
    box_calls.clear()
    mask_inputs.clear()
    feats = _c4_features()
    boxes = [p[:3] for p in _proposals()]
    with torch.no_grad():
        probs = heads.mask_probs(feats, boxes, [torch.tensor([1, 2, 3])] * 2)
        _, res5 = heads.Box_Head(feats, boxes, return_res5=True)
        expected = torch.sigmoid(heads.Mask_Outs(heads.Mask_Head(res5)))[torch.arange(6), torch.tensor([1, 2, 3] * 2)]
    assert [p.shape for p in probs] == [(3, 1, 14, 14)] * 2
    torch.testing.assert_close(torch.cat(probs)[:, 0], expected)


def test_from_cfg_reads_the_settings():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.NUM_CLASSES", 5, "MODEL.MASK_ON", True, "TEST.SCORE_THRESH", 0.3, "TEST.NMS", 0.4,
                         "TEST.DETECTIONS_PER_IM", 7, "TRAIN.FG_THRESH", 0.6, "TRAIN.BG_THRESH_HI", 0.4,
                         "TRAIN.BATCH_SIZE_PER_IM", 32, "MRCNN.WEIGHT_LOSS_MASK", 0.5, "MRCNN.DICE_LOSS_WEIGHT", 0.25,
                         "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.MLP_HEAD_DIM", 16,
                         "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up", "MRCNN.DIM_REDUCED", 8])
    heads = ROIHeads.from_cfg(cfg, C, [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64])
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.4, 7)
    assert heads.proposal_matcher.high_threshold == 0.6 and heads.proposal_matcher.low_threshold == 0.4
    assert heads.fg_bg_sampler.batch_size_per_image == 32 and heads.mask_loss_weight == 0.5
    assert heads.mask_dice_weight == 0.25
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert heads.Box_Outs.cls_score.out_features == 5 and heads.Mask_Outs.mask_fcn_logits.out_channels == 5
    assert heads.mask_on and not heads.shares_res5 and heads.Mask_Head.num_convs == 2


def test_contract_errors_are_explained():
    heads = fpn_heads().train()
    with pytest.raises(ValueError, match="needs targets"):
        heads(_fpn_features(), _proposals(), SIZES)
    no_masks = _targets(mask=False)
    with pytest.raises(ValueError, match="'masks'"):
        heads(_fpn_features(), _proposals(), SIZES, no_masks)
    with pytest.raises(TypeError, match="list of"):
        heads(_fpn_features(), torch.zeros(3, 4), SIZES)
    with pytest.raises(ValueError, match="image sizes"):
        heads(_fpn_features(), _proposals(), SIZES[:1])
    with pytest.raises(ValueError, match="go together"):
        ROIHeads(Roi2MLPHead(C, [1 / 4]), FastRCNNOutputs(1024, K1), mask_head=MaskRCNNHeadV0UpShare(16, 8))
    with pytest.raises(RuntimeError, match="no mask branch"):
        fpn_heads(mask=False).mask_probs(_fpn_features(), _proposals())
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.MASK_ON", False])
    with pytest.raises(ValueError, match="MASK_ON"):
        ROIHeads.from_cfg(cfg, C, [1 / 16], mask_outs=MaskRCNNOutputs(8, K1))
