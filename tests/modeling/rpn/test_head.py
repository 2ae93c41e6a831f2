import pytest
import torch
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from maskrcnn.modeling.rpn.head import RPNHead

# torchvision name -> ours
NAMES = {"conv.0.0": "RPN_conv", "cls_logits": "RPN_cls_score", "bbox_pred": "RPN_bbox_pred"}


def _copy_from_torchvision(tv: TVRPNHead, ours: RPNHead) -> None:
    state = {}
    for key, value in tv.state_dict().items():
        layer, what = key.rsplit(".", 1)
        state[f"{NAMES[layer]}.{what}"] = value
    ours.load_state_dict(state, strict=True)


def test_equals_torchvision_on_every_level():
    tv = TVRPNHead(8, 3)
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_(0, 0.2)
    ours = RPNHead(8, 3)
    _copy_from_torchvision(tv, ours)
    feats = [torch.randn(2, 8, 12, 16), torch.randn(2, 8, 6, 8), torch.randn(2, 8, 1, 1)]
    tv_logits, tv_deltas = tv(feats)
    # Inference runs the two predictors as torchvision does: bit-equal. Training with gradients runs them as one
    # convolution of the concatenated weights, whose oneDNN kernel may sum in another order (it does at one
    # thread): equal to float rounding.
    for training, tol in ((False, 0.0), (True, 1e-5)):
        ours.train(training)
        logits, deltas = ours(feats)
        assert len(logits) == len(deltas) == 3
        for a, b, f in zip(logits, tv_logits, feats):
            assert a.shape == (2, 3) + f.shape[-2:]
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for a, b, f in zip(deltas, tv_deltas, feats):
            assert a.shape == (2, 12) + f.shape[-2:]
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_single_tensor_is_one_level():
    head = RPNHead(4, 15)
    logits, deltas = head(torch.randn(1, 4, 5, 7))
    assert len(logits) == 1 and logits[0].shape == (1, 15, 5, 7) and deltas[0].shape == (1, 60, 5, 7)


def test_init_and_names():
    head = RPNHead(64, 3)
    assert set(dict(head.named_parameters())) == {f"{n}.{w}" for n in NAMES.values() for w in ("weight", "bias")}
    w = head.RPN_conv.weight
    assert w.shape == (64, 64, 3, 3) and head.RPN_conv.padding == (1, 1)
    assert 0.0095 < w.std().item() < 0.0105 and abs(w.mean().item()) < 5e-4
    for layer in (head.RPN_conv, head.RPN_cls_score, head.RPN_bbox_pred):
        assert torch.count_nonzero(layer.bias) == 0
    assert head.RPN_cls_score.kernel_size == (1, 1) and head.RPN_bbox_pred.out_channels == 12


def test_conv_dim():
    head = RPNHead(16, 3, conv_dim=32)
    assert head.RPN_conv.out_channels == 32 and head.RPN_cls_score.in_channels == 32
    assert RPNHead(16, 3, conv_dim=-1).RPN_conv.out_channels == 16  # Detectron's RPN.HEAD_DIM = -1
    assert RPNHead(16, 3, conv_dim=None).RPN_conv.out_channels == 16


def test_relu_between_conv_and_outputs_and_gradients():
    head = RPNHead(2, 1)
    with torch.no_grad():
        head.RPN_conv.weight.zero_()
        head.RPN_conv.bias.copy_(torch.tensor([-1.0, 2.0]))
        head.RPN_cls_score.weight.fill_(1.0)
        head.RPN_bbox_pred.weight.fill_(1.0)
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    logits, deltas = head(x)
    assert torch.all(logits[0] == 2.0) and torch.all(deltas[0] == 2.0)  # relu(-1) + relu(2)
    head2 = RPNHead(2, 3)
    logits, deltas = head2([x])
    (logits[0].sum() + deltas[0].sum()).backward()
    assert all(p.grad is not None for p in head2.parameters()) and x.grad is not None


def test_bad_inputs():
    head = RPNHead(4, 3)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        head([torch.zeros(1, 4, 2, 2), torch.zeros(1, 5, 2, 2)])
    with pytest.raises(ValueError, match="empty"):
        head([])
    with pytest.raises(ValueError, match="num_anchors"):
        RPNHead(4, 0)
