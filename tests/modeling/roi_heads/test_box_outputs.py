import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import fastrcnn_loss

from maskrcnn.config import get_cfg
from maskrcnn.modeling.roi_heads.box_outputs import FastRCNNOutputs, fast_rcnn_losses


def test_outputs_match_torchvision_predictor_with_copied_weights():
    ours = FastRCNNOutputs(32, 6)
    tv = FastRCNNPredictor(32, 6)
    tv.load_state_dict(ours.state_dict())
    x = torch.randn(10, 32)
    scores, deltas = ours(x)
    tv_scores, tv_deltas = tv(x)
    assert scores.shape == (10, 6) and deltas.shape == (10, 24)
    torch.testing.assert_close(scores, tv_scores)
    torch.testing.assert_close(deltas, tv_deltas)
    s4, d4 = ours(x[:, :, None, None])
    torch.testing.assert_close(s4, scores)
    torch.testing.assert_close(d4, deltas)


def test_init_agnostic_layout_and_empty():
    m = FastRCNNOutputs(1024, 81)
    assert abs(float(m.cls_score.weight.detach().std()) - 0.01) < 0.001
    assert abs(float(m.bbox_pred.weight.detach().std()) - 0.001) < 0.0001
    assert float(m.cls_score.bias.detach().abs().sum()) == 0 and float(m.bbox_pred.bias.detach().abs().sum()) == 0
    agnostic = FastRCNNOutputs(16, 81, cls_agnostic_bbox_reg=True)
    assert agnostic.bbox_pred.out_features == 8
    s, d = agnostic(torch.zeros(0, 16))
    assert s.shape == (0, 81) and d.shape == (0, 8)
    with pytest.raises(ValueError, match=r"\(R, C, 1, 1\)"):
        m(torch.zeros(2, 1024, 2, 2))
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.NUM_CLASSES", 5, "MODEL.CLS_AGNOSTIC_BBOX_REG", True])
    m = FastRCNNOutputs.from_cfg(cfg, 12)
    assert m.cls_score.out_features == 5 and m.bbox_pred.out_features == 8 and m.cls_score.in_features == 12


def test_losses_equal_torchvision_fastrcnn_loss():
    labels = [torch.tensor([0, 3, 0, 1, 2, 0]), torch.tensor([5, 0, 0, 0])]
    targets = [torch.randn(6, 4), torch.randn(4, 4)]
    logits = torch.randn(10, 6, requires_grad=True)
    deltas = torch.randn(10, 24, requires_grad=True)
    tv_cls, tv_box = fastrcnn_loss(logits, deltas, labels, targets)
    cls, box = fast_rcnn_losses(logits, deltas, labels, targets)
    torch.testing.assert_close(cls, tv_cls)
    torch.testing.assert_close(box, tv_box)
    cls2, box2 = fast_rcnn_losses(logits, deltas, torch.cat(labels), torch.cat(targets))
    torch.testing.assert_close(cls2, cls)
    torch.testing.assert_close(box2, box)
    (cls + box).backward()
    assert float(logits.grad.abs().sum()) > 0
    # Only the deltas of each foreground RoI's own class get a gradient.
    grad_rows = deltas.grad.reshape(10, 6, 4).abs().sum(-1) > 0
    expected = torch.zeros(10, 6, dtype=torch.bool)
    for r, lab in enumerate(torch.cat(labels).tolist()):
        if lab > 0:
            expected[r, lab] = True
    assert torch.equal(grad_rows, expected)


def test_hand_built_loss_values():
    # Two RoIs, 3 classes. Uniform logits -> CE = log(3). RoI 0 is class 2 with delta errors 0.05 (quadratic
    # branch, 0.5 * 0.05^2 * 9 each) and 1.0 (linear, 1 - 0.5/9); RoI 1 is background and adds nothing.
    logits = torch.zeros(2, 3)
    deltas = torch.zeros(2, 12)
    deltas[0, 8:12] = torch.tensor([0.05, 0.0, 1.0, 0.0])
    deltas[1] = 5.0
    labels = torch.tensor([2, 0])
    targets = torch.zeros(2, 4)
    cls, box = fast_rcnn_losses(logits, deltas, labels, targets)
    assert cls.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    expected = (0.5 * 0.05 ** 2 * 9 + (1.0 - 0.5 / 9)) / 2
    assert box.item() == pytest.approx(expected, rel=1e-5)
    assert fast_rcnn_losses(logits, deltas, labels, targets, beta=1.0)[1].item() == pytest.approx(
        (0.5 * 0.05 ** 2 + 0.5) / 2, rel=1e-5)


def test_class_agnostic_loss_uses_foreground_box():
    labels = torch.tensor([3, 0, 1])
    targets = torch.randn(3, 4)
    logits = torch.randn(3, 5)
    deltas8 = torch.randn(3, 8)
    _, box = fast_rcnn_losses(logits, deltas8, labels, targets)
    fg = labels > 0
    expected = F.smooth_l1_loss(deltas8[fg, 4:], targets[fg], beta=1 / 9, reduction="sum") / 3
    torch.testing.assert_close(box, expected)
    _, box4 = fast_rcnn_losses(logits, deltas8[:, 4:], labels, targets)
    torch.testing.assert_close(box4, expected)


def test_empty_and_bad_inputs():
    logits = torch.zeros(0, 4, requires_grad=True)
    deltas = torch.zeros(0, 16, requires_grad=True)
    cls, box = fast_rcnn_losses(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert cls.item() == 0 and box.item() == 0
    (cls + box).backward()
    assert logits.grad is not None and deltas.grad is not None
    with pytest.raises(ValueError, match="labels"):
        fast_rcnn_losses(torch.zeros(3, 4), torch.zeros(3, 16), torch.zeros(2, dtype=torch.int64), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bbox_pred"):
        fast_rcnn_losses(torch.zeros(3, 4), torch.zeros(3, 12), torch.zeros(3, dtype=torch.int64), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="num_classes"):
        FastRCNNOutputs(8, 1)
