import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss, project_masks_on_boxes

from maskrcnn.config import get_cfg
from maskrcnn.modeling.roi_heads.mask_outputs import (MaskRCNNOutputs, mask_dice_loss, mask_probs_for_labels,
                                                      mask_rcnn_loss)


def test_logits_match_torchvision_predictor_with_copied_weights():
    ours = MaskRCNNOutputs(8, 5)
    pred = MaskRCNNPredictor(8, 8, 5)
    with torch.no_grad():
        ours.mask_fcn_logits.bias.uniform_(-0.1, 0.1)
    pred.mask_fcn_logits.load_state_dict(ours.mask_fcn_logits.state_dict())
    x = torch.randn(6, 8, 28, 28)
    out = ours(x)
    assert out.shape == (6, 5, 28, 28)
    torch.testing.assert_close(out, pred.mask_fcn_logits(x))
    assert ours(torch.zeros(0, 8, 28, 28)).shape == (0, 5, 28, 28)
    agnostic = MaskRCNNOutputs(8, 5, cls_specific=False)
    assert agnostic(x).shape == (6, 1, 28, 28)


def test_init_and_from_cfg():
    m = MaskRCNNOutputs(256, 81)
    assert float(m.mask_fcn_logits.weight.detach().std()) == pytest.approx(math.sqrt(2.0 / 81), rel=0.03)
    assert float(m.mask_fcn_logits.bias.detach().abs().sum()) == 0
    g = MaskRCNNOutputs(256, 81, conv_init="GaussianFill")
    assert float(g.mask_fcn_logits.weight.detach().std()) == pytest.approx(0.001, rel=0.03)
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.NUM_CLASSES", 4, "MRCNN.CLS_SPECIFIC_MASK", False])
    m = MaskRCNNOutputs.from_cfg(cfg, 16)
    assert m.mask_fcn_logits.out_channels == 1 and m.mask_fcn_logits.in_channels == 16
    with pytest.raises(ValueError, match="num_classes"):
        MaskRCNNOutputs(8, 1)


def test_loss_equals_torchvision_maskrcnn_loss():
    # Two images; the RoIs are foreground proposals matched to gt masks.
    gt_masks = [torch.rand(3, 40, 50) > 0.5, torch.rand(2, 30, 30) > 0.5]
    gt_labels = [torch.tensor([1, 4, 2]), torch.tensor([3, 3])]
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 30.0], [5.0, 5.0, 45.0, 35.0], [10.0, 2.0, 30.0, 12.0],
                               [1.0, 1.0, 49.0, 39.0]]), torch.tensor([[3.0, 4.0, 25.0, 28.0]])]
    matched = [torch.tensor([0, 1, 2, 1]), torch.tensor([1])]
    logits = torch.randn(5, 5, 14, 14, requires_grad=True)
    expected = maskrcnn_loss(logits, proposals, [m.float() for m in gt_masks], gt_labels, matched)
    labels = torch.cat([gl[m] for gl, m in zip(gt_labels, matched)])
    targets = torch.cat([project_masks_on_boxes(g.float(), p, m, 14) for g, p, m in zip(gt_masks, proposals, matched)])
    loss = mask_rcnn_loss(logits, labels, targets)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(mask_rcnn_loss(logits, [labels[:4], labels[4:]], [targets[:4], targets[4:]]), loss)
    loss.backward()
    # Only each RoI's own class channel gets a gradient.
    touched = logits.grad.abs().sum(dim=(2, 3)) > 0
    expected_touched = torch.zeros(5, 5, dtype=torch.bool)
    expected_touched[torch.arange(5), labels] = True
    assert torch.equal(touched, expected_touched)


def test_hand_built_loss():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    logits[1, 2] = 100.0
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    loss = mask_rcnn_loss(logits, torch.tensor([1, 2]), targets)
    # Pixels: two near-perfect (~4.5e-5 each), two at logit 0 (log 2 each), four perfect (~0).
    expected = (2 * math.log(2.0) + 2 * math.log1p(math.exp(-10.0))) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    agnostic = mask_rcnn_loss(logits[:, 1:2], torch.tensor([1, 2]), targets)
    assert agnostic.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits[:, 1], targets).item(), rel=1e-6)


def test_hand_built_dice_loss():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = torch.tensor([[100.0, -100.0], [0.0, 0.0]])
    logits[1, 2] = 100.0
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    loss = mask_dice_loss(logits, torch.tensor([1, 2]), targets, eps=1.0)
    # RoI 0: p = (1, 0, .5, .5), t = (1, 0, 1, 0): 2 * 1.5 + 1 over 2 + 2 + 1. RoI 1: p = t = 1, so dice 1.
    expected = (1 - 4.0 / 5.0 + 0.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Only the RoI's own class channel counts: the other channels' logits change nothing.
    other = logits.clone()
    other[0, 2] = 50.0
    other[1, 0] = -50.0
    assert mask_dice_loss(other, torch.tensor([1, 2]), targets).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_weighs_a_thin_object_more_than_cross_entropy():
    # A one-pixel line in a 28x28 box predicted as background everywhere: cross entropy barely notices (the line is
    # 1/28 of the pixels), Dice is near its maximum; both fall when the line is predicted.
    targets = torch.zeros(1, 28, 28)
    targets[0, :, 14] = 1.0
    missed = torch.full((1, 2, 28, 28), -6.0)
    found = missed.clone()
    found[0, 1, :, 14] = 6.0
    labels = torch.tensor([1])
    assert mask_rcnn_loss(missed, labels, targets).item() < 0.25
    assert mask_dice_loss(missed, labels, targets).item() > 0.9
    assert mask_dice_loss(found, labels, targets).item() < 0.1


@pytest.mark.parametrize("loss_fn", [mask_rcnn_loss, mask_dice_loss])
def test_empty_loss_keeps_graph(loss_fn):
    logits = torch.zeros(0, 5, 14, 14, requires_grad=True)
    loss = loss_fn(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 14, 14))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("loss_fn", [mask_rcnn_loss, mask_dice_loss])
def test_bad_inputs_are_named(loss_fn):
    with pytest.raises(ValueError, match=f"{loss_fn.__name__}: mask_targets"):
        loss_fn(torch.zeros(2, 3, 14, 14), torch.tensor([1, 2]), torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.zeros(2, 3, 14, 14), torch.tensor([1, 5]), torch.zeros(2, 14, 14))
    with pytest.raises(ValueError, match="labels"):
        mask_probs_for_labels(torch.zeros(2, 3, 14, 14), torch.tensor([1]))


def test_mask_probs_for_labels_matches_torchvision_inference():
    logits = torch.randn(7, 4, 28, 28)
    labels = [torch.tensor([1, 3, 2]), torch.tensor([3, 3, 1, 2])]
    expected = torch.cat(maskrcnn_inference(logits, labels))
    probs = mask_probs_for_labels(logits, torch.cat(labels))
    assert probs.shape == (7, 1, 28, 28)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(mask_probs_for_labels(logits, labels), expected)
    agnostic = mask_probs_for_labels(logits[:, :1], torch.cat(labels))
    torch.testing.assert_close(agnostic, logits[:, :1].sigmoid())
    assert mask_probs_for_labels(torch.zeros(0, 4, 28, 28), torch.zeros(0, dtype=torch.int64)).shape == (0, 1, 28, 28)


@pytest.mark.parametrize("channels_last", [False, True])
def test_label_logits_are_the_labels_channels_of_forward(channels_last):
    """``label_logits`` computes only each RoI's own class channel: forward's logits at that channel, in fp32, with
    the bias; under bf16 autocast within bf16 rounding of forward's."""
    torch.manual_seed(0)
    outs = MaskRCNNOutputs(16, 7)
    torch.nn.init.normal_(outs.mask_fcn_logits.bias)
    x = torch.randn(5, 16, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 6, 3, 3, 1])
    ref = outs(x)[torch.arange(5), labels][:, None]
    got = outs.label_logits(x, labels)
    assert got.shape == (5, 1, 6, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16, got16 = outs(x)[torch.arange(5), labels][:, None], outs.label_logits(x, labels)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16, ref16.float(), rtol=2e-2, atol=5e-2)
    assert outs.label_logits(x[:0], labels[:0]).shape == (0, 1, 6, 6)
    with pytest.raises(ValueError, match=r"label_logits: labels must be in \[0, 7\)"):
        outs.label_logits(x, torch.tensor([0, 7, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must be \(5,\)"):
        outs.label_logits(x, labels[:3])
    agnostic = MaskRCNNOutputs(16, 7, cls_specific=False)
    torch.testing.assert_close(agnostic.label_logits(x, labels), agnostic(x))
