"""relu_after (in place only where nothing else can hold the layer's output) and the heads' feature_stack(): the
layer/ReLU chain that forward runs after the RoI transform, which speed features replace as one module."""
import pytest
import torch
from torch import nn

from maskrcnn.modeling.activation import relu_after, relu_stack
from maskrcnn.modeling.roi_heads.box_head import Roi2MLPHead
from maskrcnn.modeling.roi_heads.keypoint_head import KeypointRCNNConvHead
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNFCNHead

SCALES = [1 / 4, 1 / 8]


def test_relu_after_in_place_only_without_autograd_and_never_on_the_input():
    x = torch.randn(4, 8)
    y = x * 2
    with torch.no_grad():
        z = relu_after(y, x)
    assert z is y and (y >= 0).all()  # in place: y is a fresh output nobody else holds
    assert relu_after(x, x) is not x and (x < 0).any()  # a layer that returned its input (nn.Identity): untouched
    w = torch.randn(4, 8, requires_grad=True)
    y = w * 2
    z = relu_after(y, w)
    assert z is not y  # recorded by autograd: out of place, so that backward sees what it saved
    z.sum().backward()
    assert torch.equal(w.grad, 2.0 * (w > 0))


def test_relu_stack_holds_the_layers_themselves():
    a, b = nn.Linear(4, 3), nn.Linear(3, 2)
    stack = relu_stack([a, b], flatten=True)
    assert stack[1] is a and stack[3] is b and isinstance(stack[0], nn.Flatten)
    assert [type(m).__name__ for m in stack] == ["Flatten", "Linear", "ReLU", "Linear", "ReLU"]


def _check_stack_matches_forward(head):
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 64, 64), torch.randn(2, 4, 32, 32)]
    boxes = [torch.tensor([[4.0, 4.0, 60.0, 40.0], [10.0, 20.0, 200.0, 240.0]]), torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    for p in head.parameters():
        nn.init.normal_(p, std=0.2)  # non-zero biases too: every term of the chain counts
    head.eval()
    with torch.no_grad():
        plain = head(feats, boxes)
        head.fused_stack = head.feature_stack()
        stacked = head(feats, boxes)
        head.fused_stack = None
        again = head(feats, boxes)
    assert torch.equal(plain, stacked) and torch.equal(plain, again)


@pytest.mark.parametrize("make", [
    lambda: MaskRCNNFCNHead(4, SCALES, resolution=7, num_convs=2, dim=8),
    lambda: MaskRCNNFCNHead(4, SCALES, resolution=7, num_convs=0, dim=8),
    lambda: Roi2MLPHead(4, SCALES, resolution=7, mlp_dim=16),
    lambda: KeypointRCNNConvHead(4, SCALES, resolution=7, num_convs=2, dim=8),
], ids=["mask", "mask-no-convs", "box-2mlp", "keypoint"])
def test_feature_stack_computes_what_forward_computes(make):
    _check_stack_matches_forward(make())


def test_no_stack_where_the_layers_are_not_a_plain_chain():
    assert MaskRCNNFCNHead(4, SCALES, num_convs=2, dim=32, use_gn=True).feature_stack() is None
    assert KeypointRCNNConvHead(4, SCALES, num_convs=0, dim=8).feature_stack() is None
