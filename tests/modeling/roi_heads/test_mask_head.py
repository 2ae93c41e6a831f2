import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.roi_heads.box_head import ResNetRoIConv5Head
from maskrcnn.modeling.roi_heads.mask_head import (MaskRCNNFCNHead, MaskRCNNHeadV0Up, MaskRCNNHeadV0UpShare,
                                                   build_mask_head)
from maskrcnn.ops.poolers import MultiLevelRoIAlign

IMG = 512
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _pyramid(n=2, c=4):
    return [torch.randn(n, c, IMG // 2 ** k, IMG // 2 ** k) for k in range(2, 7)]


def _boxes(n, lo=8.0, hi=480.0, size=IMG):
    w = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi)))
    h = (w * torch.empty(n).uniform_(0.5, 2.0)).clamp(max=size)
    x1 = torch.rand(n) * (size - w)
    y1 = torch.rand(n) * (size - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def _tv_fcn(ours, in_channels, dim, num_convs, dilation):
    """torchvision's mask_roi_pool + mask_head + mask_predictor.conv5_mask with our weights (random biases)."""
    heads = MaskRCNNHeads(in_channels, [dim] * num_convs, dilation)
    pred = MaskRCNNPredictor(dim, dim, 3)
    with torch.no_grad():
        for i in range(num_convs):
            conv = getattr(ours, f"mask_fcn{i + 1}")
            conv.bias.uniform_(-0.1, 0.1)
            heads[i][0].weight.copy_(conv.weight)
            heads[i][0].bias.copy_(conv.bias)
        ours.conv5_mask.bias.uniform_(-0.1, 0.1)
        pred.conv5_mask.weight.copy_(ours.conv5_mask.weight)
        pred.conv5_mask.bias.copy_(ours.conv5_mask.bias)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)

    def run(feats, boxes):
        fdict = OrderedDict((str(i), f) for i, f in enumerate(feats))
        return pred.relu(pred.conv5_mask(heads(pool(fdict, boxes, [(IMG, IMG)] * len(boxes)))))

    return run


@pytest.mark.parametrize("num_convs,dilation", [(4, 1), (2, 1), (2, 2)])
def test_fcn_head_matches_torchvision_mask_head(num_convs, dilation):
    head = MaskRCNNFCNHead(4, SCALES, resolution=14, sampling_ratio=2, num_convs=num_convs, dim=8, dilation=dilation)
    assert isinstance(head.roi_xform, MultiLevelRoIAlign) and not head.shares_box_head_res5
    tv = _tv_fcn(head, 4, 8, num_convs, dilation)
    feats = _pyramid()
    boxes = [_boxes(12), _boxes(9)]
    out = head(feats, boxes)
    assert out.shape == (21, 8, 28, 28) and head.out_channels == 8
    torch.testing.assert_close(out, tv(feats, boxes), rtol=1e-4, atol=1e-5)
    names = {n for n, _ in head.named_parameters()}
    assert names == {f"mask_fcn{i}.{k}" for i in range(1, num_convs + 1) for k in ("weight", "bias")} | {
        "conv5_mask.weight", "conv5_mask.bias"}


def test_fcn_head_init():
    head = MaskRCNNFCNHead(256, SCALES, num_convs=1, dim=256)
    std = float(head.mask_fcn1.weight.detach().std())
    assert std == pytest.approx(math.sqrt(2.0 / (256 * 9)), rel=0.02)
    assert float(head.conv5_mask.weight.detach().std()) == pytest.approx(math.sqrt(2.0 / (256 * 4)), rel=0.02)
    assert float(head.mask_fcn1.bias.detach().abs().sum()) == 0
    assert float(head.conv5_mask.bias.detach().abs().sum()) == 0
    gauss = MaskRCNNFCNHead(256, SCALES, num_convs=1, dim=256, conv_init="GaussianFill")
    assert float(gauss.mask_fcn1.weight.detach().std()) == pytest.approx(0.001, rel=0.02)
    assert float(gauss.conv5_mask.weight.detach().std()) == pytest.approx(0.001, rel=0.02)
    with pytest.raises(ValueError, match="conv_init"):
        MaskRCNNFCNHead(4, SCALES, conv_init="XavierFill")


def test_fcn_head_empty_gradients_and_zero_convs():
    head = MaskRCNNFCNHead(4, SCALES, num_convs=2, dim=8)
    feats = [f.requires_grad_() for f in _pyramid()]
    assert head(feats, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 8, 28, 28)
    head(feats, [_boxes(10), _boxes(10)]).pow(2).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(float(f.grad.abs().sum()) > 0 for f in feats[:4])
    bare = MaskRCNNFCNHead(4, [1 / 16], resolution=7, num_convs=0, dim=8)
    assert bare.conv5_mask.in_channels == 4
    assert bare(torch.randn(1, 4, 8, 8), [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]).shape == (1, 8, 14, 14)


def test_v0upshare_on_res5_map():
    head = MaskRCNNHeadV0UpShare(dim_in=32, dim=8)
    assert head.shares_box_head_res5 and head.out_channels == 8
    pred = MaskRCNNPredictor(32, 8, 3)
    with torch.no_grad():
        head.conv5_mask.bias.uniform_(-0.1, 0.1)
        pred.conv5_mask.load_state_dict(head.conv5_mask.state_dict())
    res5 = torch.randn(5, 32, 7, 7, requires_grad=True)
    out = head(res5)
    assert out.shape == (5, 8, 14, 14)
    torch.testing.assert_close(out, pred.relu(pred.conv5_mask(res5)))
    out.pow(2).sum().backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in head.parameters())
    assert float(res5.grad.abs().sum()) > 0
    assert head(torch.zeros(0, 32, 7, 7)).shape == (0, 8, 14, 14)
    with pytest.raises(ValueError, match="res5 map"):
        head(torch.zeros(5, 16, 7, 7))


def test_v0upshare_with_c4_box_head_res5():
    box = ResNetRoIConv5Head(16, width_per_group=2, out_channels=32)
    mask = MaskRCNNHeadV0UpShare(dim_in=box.out_channels, dim=8)
    feat = torch.randn(2, 16, 10, 10)
    boxes = [_boxes(3, hi=150.0, size=160.0), _boxes(2, hi=150.0, size=160.0)]
    _, res5 = box(feat, boxes, return_res5=True)
    assert mask(res5).shape == (5, 8, 14, 14)


def _small_v0up(**kw):
    args = dict(in_channels=16, resolution=14, sampling_ratio=0, spatial_scale=1 / 16, dim=8, width_per_group=2,
                norm="FrozenBN", res5_channels=32)
    args.update(kw)
    return MaskRCNNHeadV0Up(**args)


def test_v0up_own_res5():
    head = _small_v0up()
    assert not head.shares_box_head_res5 and len(head.res5) == 3 and head.res5[0].input_stride == 2
    feat = torch.randn(2, 16, 10, 10, requires_grad=True)
    boxes = [_boxes(4, hi=150.0, size=160.0), _boxes(3, hi=150.0, size=160.0)]
    out = head(feat, boxes)
    assert out.shape == (7, 8, 14, 14)
    pooled = torchvision.ops.roi_align(feat, boxes, 14, 1 / 16, 0)
    torch.testing.assert_close(out, F.relu(head.conv5_mask(head.res5(pooled))), rtol=1e-4, atol=1e-5)
    out.pow(2).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert head(feat, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 8, 14, 14)
    dilated = _small_v0up(dilation=2)
    assert dilated.res5[0].conv1.stride == (1, 1) and dilated.res5[0].conv2.dilation == (2, 2)
    assert dilated(feat, boxes).shape == (7, 8, 28, 28)


def test_build_mask_head_from_cfg():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FAST_RCNN.ROI_BOX_HEAD",
                         "fast_rcnn_heads.roi_2mlp_head", "MRCNN.ROI_MASK_HEAD",
                         "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs", "MRCNN.DIM_REDUCED", 8,
                         "MRCNN.ROI_XFORM_RESOLUTION", 14, "MRCNN.ROI_XFORM_SAMPLING_RATIO", 2, "MRCNN.DILATION", 1,
                         "MRCNN.CONV_INIT", "MSRAFill"])
    assert_and_infer_cfg(cfg, make_immutable=False)
    pyramid_scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
    head = build_mask_head(cfg, 4, pyramid_scales)
    assert isinstance(head, MaskRCNNFCNHead) and head.num_convs == 4 and head.out_channels == 8
    assert head.feature_indices == [0, 1, 2, 3] and head.roi_xform.sampling_ratio == 2
    assert head(_pyramid(), [_boxes(2), _boxes(1)]).shape == (3, 8, 28, 28)
    cfg.MRCNN.ROI_MASK_HEAD = "mask_rcnn_heads.mask_rcnn_fcn_head_v1up"
    assert build_mask_head(cfg, 4, pyramid_scales).num_convs == 2
    cfg.MRCNN.ROI_MASK_HEAD = "mask_rcnn_fcn_head_v9"
    with pytest.raises(ValueError, match="ROI_MASK_HEAD"):
        build_mask_head(cfg, 4, pyramid_scales)

    cfg = get_cfg()  # defaults: C4 with v0upshare
    cfg.merge_from_list(["RESNETS.WIDTH_PER_GROUP", 2, "MRCNN.DIM_REDUCED", 8])
    assert_and_infer_cfg(cfg, make_immutable=False)
    box = ResNetRoIConv5Head.from_cfg(cfg, 16, [1 / 16])
    head = build_mask_head(cfg, 16, [1 / 16], box_head=box)
    assert isinstance(head, MaskRCNNHeadV0UpShare) and head.conv5_mask.in_channels == 32
    assert float(head.conv5_mask.weight.detach().std()) == pytest.approx(0.001, rel=0.1)  # GaussianFill default
    cfg.MRCNN.ROI_MASK_HEAD = "mask_rcnn_heads.mask_rcnn_fcn_head_v0up"
    cfg.MRCNN.DILATION = 1
    head = build_mask_head(cfg, 16, [1 / 16])
    assert isinstance(head, MaskRCNNHeadV0Up) and head.roi_xform.output_size == (7, 7)
    assert head.res5[0].conv1.stride == (1, 1)  # ROI_XFORM_RESOLUTION 7 -> stride 1, as Detectron
    assert head(torch.randn(1, 16, 6, 6), [torch.tensor([[0.0, 0.0, 60.0, 50.0]])]).shape == (1, 8, 14, 14)
