"""CascadeROIHeads (maskrcnn/modeling/roi_heads/cascade.py) alone on tiny inputs: constructor and config checks,
the gradient scaling, each stage's labels and targets against hand-computed values, the chaining of stages in
training and inference, stage-averaged scores, the converter's names, a training step and export's refusal.
Equality with detectron2's CascadeROIHeads: tests/utils/test_cascade_vs_detectron2.py."""
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import ConfigError, assert_and_infer_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.roi_heads import CascadeROIHeads, FastRCNNOutputs, Roi2MLPHead, scale_gradient
from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.boxes import box_iou
from maskrcnn.utils.weights.detectron2 import canonical_to_detectron2, detectron2_to_canonical
from maskrcnn.utils.weights.ours import canonical_to_ours, ours_to_canonical
from tests.modeling.test_generalized_rcnn import make_batch, small_cfg

CASCADE = {"MODEL.CASCADE_ON": True, "MODEL.CLS_AGNOSTIC_BBOX_REG": True}
WEIGHTS = [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]


def _heads(num_classes=3, stages=3, **kwargs) -> CascadeROIHeads:
    torch.manual_seed(0)
    box_heads = [Roi2MLPHead(8, [0.25], resolution=4, mlp_dim=16) for _ in range(stages)]
    outs = [FastRCNNOutputs(16, num_classes, cls_agnostic_bbox_reg=True) for _ in range(stages)]
    return CascadeROIHeads(box_heads, outs, box_coders=[BoxCoder(w) for w in WEIGHTS[:stages]],
                           ious=[0.5, 0.6, 0.7][:stages], score_thresh=0.0, **kwargs)


def _features():
    return [torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(1))]


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5))


def test_constructor_refuses_what_cannot_cascade():
    head = Roi2MLPHead(8, [0.25], resolution=4, mlp_dim=16)
    with pytest.raises(ValueError, match="class-agnostic"):
        CascadeROIHeads([head], [FastRCNNOutputs(16, 3)], box_coders=[BoxCoder(WEIGHTS[0])], ious=[0.5])
    with pytest.raises(ValueError, match="one box head, box outputs, box coder, IoU and loss weight per stage"):
        CascadeROIHeads([head, head], [FastRCNNOutputs(16, 3, True)], box_coders=[BoxCoder(WEIGHTS[0])],
                        ious=[0.5])
    with pytest.raises(TypeError, match="box_coders="):
        CascadeROIHeads([head], [FastRCNNOutputs(16, 3, True)], box_coders=[BoxCoder(WEIGHTS[0])], ious=[0.5],
                        box_coder=BoxCoder(WEIGHTS[0]))


@pytest.mark.parametrize("overrides, message", [
    ({"MODEL.CASCADE_ON": True}, "MODEL.CLS_AGNOSTIC_BBOX_REG True"),
    ({**CASCADE, "CASCADE_RCNN.IOUS": [0.6, 0.6, 0.7]}, "must equal TRAIN.FG_THRESH"),
    ({**CASCADE, "CASCADE_RCNN.STAGE_WEIGHTS": [1.0, 1.0]}, "one entry per stage"),
    ({**CASCADE, "CASCADE_RCNN.IOUS": [0.5, 1.2, 0.7]}, "must lie in"),
])
def test_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        assert_and_infer_cfg(small_cfg("fpn", **overrides))
    with pytest.raises(ConfigError, match="ResNet_roi_conv5_head"):
        assert_and_infer_cfg(small_cfg("c4", **CASCADE))


def test_stage_labels_and_targets_are_the_hand_computed_ones():
    heads = _heads()
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    # IoUs with gt: 1.0, 20/31 = 0.645 (fg at stage 1 (0.6), bg at stage 2 (0.7)), 20/36 = 0.556 (bg from stage 1 on).
    rois = torch.tensor([[10.0, 10.0, 30.0, 30.0], [10.0, 10.0, 30.0, 41.0], [10.0, 10.0, 30.0, 46.0]])
    iou = box_iou(gt, rois)[0]
    assert iou[1] > 0.6 > iou[2] > 0.5 and iou[1] < 0.7
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    for k, want in ((1, [2, 2, 0]), (2, [2, 0, 0])):
        labels, reg = heads.label_stage(k, [rois], targets)
        assert labels[0].tolist() == want
        torch.testing.assert_close(reg[0], BoxCoder(WEIGHTS[k]).encode(gt.expand(3, 4), rois))
    labels, reg = heads.label_stage(1, [rois], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    assert labels[0].tolist() == [0, 0, 0] and torch.equal(reg[0], torch.zeros(3, 4))


def test_next_stage_rois_are_the_regressed_boxes_detached_and_clipped():
    heads = _heads()
    rois = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [40.0, 40.0, 63.0, 60.0]])]
    deltas = torch.zeros(2, 8, requires_grad=True)
    d = deltas.detach().clone()
    d[1, 4:] = torch.tensor([10.0, 0.0, 5.0, 0.0])  # one box width to the right, twice as wide
    out = heads.regressed_boxes(0, d.requires_grad_(), rois, [(64, 64)])
    assert not out[0].requires_grad
    torch.testing.assert_close(out[0][0], rois[0][0])
    want = BoxCoder(WEIGHTS[0]).decode(d[1:, 4:].detach(), rois[0][1:]).clamp(max=64)
    torch.testing.assert_close(out[0][1:], want)
    assert out[0][1, 2] == 64


def test_inference_averages_the_stage_scores_and_keeps_the_last_stage_boxes():
    heads = _heads().eval()
    feats = _features()
    props = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 20.0, 50.0, 60.0]]),
             torch.tensor([[0.0, 0.0, 40.0, 40.0]])]
    sizes = [(64, 64), (64, 64)]
    with torch.no_grad():
        probs, boxes = heads.predict_boxes(feats, props, sizes)
        rois, want_probs = props, []
        for k in range(3):
            cls, reg = heads.Box_Outs[k](heads.Box_Head[k](feats, rois))
            want_probs.append(F.softmax(cls, -1))
            last = torch.cat([heads.box_coders[k].decode(reg[:, 4:], torch.cat(rois))]).clamp(0, 64)
            rois = list(last.split([2, 1]))
        mean = sum(want_probs) / 3
    torch.testing.assert_close(torch.cat(probs), mean)
    for b, r in zip(boxes, rois):
        assert b.shape == (r.shape[0], 4 * 3)
        for j in range(3):
            torch.testing.assert_close(b[:, 4 * j: 4 * j + 4], r)


def test_each_stage_sends_a_third_of_its_gradient_into_the_features():
    heads = _heads().train()
    rois = [torch.tensor([[2.0, 2.0, 30.0, 30.0]]), torch.tensor([[0.0, 0.0, 40.0, 40.0]])]
    grads = []
    for train in (True, False):
        heads.train(train)
        feats = [f.clone().requires_grad_() for f in _features()]
        cls, reg = heads.run_stage(1, feats, rois)
        (cls.sum() + reg.sum()).backward()
        grads.append(feats[0].grad)
    torch.testing.assert_close(grads[0], grads[1] / 3)


def test_a_cascade_model_trains_with_per_stage_losses_and_predicts():
    cfg = assert_and_infer_cfg(small_cfg("fpn", **CASCADE, **{"CASCADE_RCNN.STAGE_WEIGHTS": [1.0, 0.5, 0.25]}))
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg)
    assert isinstance(model.roi_heads, CascadeROIHeads) and len(model.Box_Head) == 3
    assert model.roi_heads.stage_loss_weights == [1.0, 0.5, 0.25]
    images, targets = make_batch()
    losses = model.train()(images, targets)
    assert {f"loss_{t}_stage{k}" for t in ("cls", "bbox") for k in range(3)} | {"loss_mask"} <= set(losses)
    assert "loss_cls" not in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for k in range(3):
        assert model.Box_Outs[k].cls_score.weight.grad.abs().sum() > 0
        assert model.Box_Head[k].fc6.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()(images)
    assert all(o["boxes"].shape[0] > 0 and o["masks"].shape[0] == o["boxes"].shape[0] for o in out)


def test_detectron2_names_round_trip():
    cfg = assert_and_infer_cfg(small_cfg("fpn", **CASCADE))
    torch.manual_seed(0)
    sd = Generalized_RCNN(cfg).state_dict()
    d2 = canonical_to_detectron2(ours_to_canonical(sd))
    assert {k for k in d2 if k.startswith("roi_heads.box_")} >= {
        f"roi_heads.box_{part}.{k}.{layer}.weight" for k in range(3)
        for part, layer in (("head", "fc1"), ("head", "fc2"), ("predictor", "cls_score"), ("predictor", "bbox_pred"))}
    assert d2["roi_heads.box_predictor.2.bbox_pred.weight"].shape[0] == 4  # detectron2's class-agnostic layout
    back, _ = canonical_to_ours(detectron2_to_canonical({"model": d2})[0], target=sd)
    assert set(back) == set(sd)
    for key, t in back.items():
        if key.endswith("bbox_pred.weight") or key.endswith("bbox_pred.bias"):
            assert torch.equal(t[4:], sd[key][4:])  # the unused background deltas come back as zeros
        elif "mask_fcn_logits" in key:
            assert torch.equal(t[1:], sd[key][1:])
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(t, sd[key]), key


def test_export_refuses_a_cascade_model():
    from maskrcnn.export.wrapper import ExportableMaskRCNN
    model = Generalized_RCNN(assert_and_infer_cfg(small_cfg("fpn", **CASCADE))).eval()
    with pytest.raises(ValueError, match="Cascade R-CNN"):
        ExportableMaskRCNN(model)
