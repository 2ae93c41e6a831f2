from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.backbone.resnet import BottleneckBlock, FrozenBatchNorm2d
from maskrcnn.modeling.roi_heads.box_head import (ResNetRoIConv5Head, Roi2MLPHead, as_rois, build_box_head,
                                                  fpn_feature_indices)
from maskrcnn.ops.poolers import MultiLevelRoIAlign
from maskrcnn.ops.roi_align import RoIAlign
from maskrcnn.ops.roi_pool import RoIPool

IMG = 512
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _pyramid(n=2, c=4):
    """P2..P6 of a 512x512 batch (P6 is not pooled)."""
    return [torch.randn(n, c, IMG // 2 ** k, IMG // 2 ** k) for k in range(2, 7)]


def _boxes(n, lo=8.0, hi=480.0, size=IMG):
    # Sides from 8 to ~480 px so RoIs land on every level P2..P5.
    w = torch.exp(torch.empty(n).uniform_(float(np.log(lo)), float(np.log(hi))))
    h = (w * torch.empty(n).uniform_(0.5, 2.0)).clamp(max=size)
    x1 = torch.rand(n) * (size - w)
    y1 = torch.rand(n) * (size - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def _copy_mlp(ours, tv):
    with torch.no_grad():
        for name in ("fc6", "fc7"):
            getattr(tv, name).weight.copy_(getattr(ours, name).weight)
            getattr(tv, name).bias.copy_(getattr(ours, name).bias.uniform_(-0.1, 0.1))


def test_roi_2mlp_head_matches_torchvision_multiscale_two_mlp_head():
    feats = _pyramid()
    boxes = [_boxes(40), _boxes(25)]
    head = Roi2MLPHead(4, SCALES, resolution=7, sampling_ratio=2, mlp_dim=32)
    assert isinstance(head.roi_xform, MultiLevelRoIAlign)
    tv_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    tv_head = TwoMLPHead(4 * 7 * 7, 32)
    _copy_mlp(head, tv_head)
    fdict = OrderedDict((str(i), f) for i, f in enumerate(feats))
    expected = tv_head(tv_pool(fdict, boxes, [(IMG, IMG)] * 2))
    levels = head.roi_xform.map_levels(torch.cat(boxes))
    assert len(set(levels.tolist())) == 4  # every pyramid level is exercised
    out = head(feats, boxes)
    assert out.shape == (65, 32) and out.dtype == torch.float32 and head.out_channels == 32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_roi_forms_agree_and_p6_is_not_pooled():
    feats = _pyramid()
    boxes = [_boxes(6), _boxes(3)]
    head = Roi2MLPHead(4, SCALES, mlp_dim=16)
    ref = head(feats, boxes)
    rois = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    torch.testing.assert_close(head(feats, rois), ref)
    torch.testing.assert_close(head(feats, {"rois": rois.numpy().astype(np.float64)}), ref)
    torch.testing.assert_close(head(feats, [b.numpy() for b in boxes]), ref)
    torch.testing.assert_close(head(feats[:4], boxes), ref)
    feats[4] = feats[4] + 100.0
    torch.testing.assert_close(head(feats, boxes), ref)
    torch.testing.assert_close(as_rois([b.numpy() for b in boxes]), rois)


def test_feature_indices_pick_levels():
    feats = _pyramid()
    boxes = [_boxes(5), _boxes(5)]
    head = Roi2MLPHead(4, SCALES[1:], mlp_dim=8, feature_indices=[1, 2, 3])
    ref = Roi2MLPHead(4, SCALES[1:], mlp_dim=8)
    ref.load_state_dict(head.state_dict())
    torch.testing.assert_close(head(feats, boxes), ref(feats[1:4], boxes))
    assert fpn_feature_indices([1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64], 2, 5) == [0, 1, 2, 3]
    assert fpn_feature_indices([1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64], 3, 5) == [1, 2, 3]
    assert fpn_feature_indices([1 / 16], 2, 5) == [0]


@pytest.mark.parametrize("method", ["RoIAlign", "RoIPoolF"])
def test_single_level_head_matches_torchvision_ops(method):
    feat = torch.randn(2, 6, 20, 24)
    boxes = [_boxes(7, hi=300.0), _boxes(4, hi=300.0)]
    head = Roi2MLPHead(6, [1 / 16], resolution=5, sampling_ratio=0, mlp_dim=16, roi_xform=method)
    assert isinstance(head.roi_xform, RoIAlign if method == "RoIAlign" else RoIPool)
    if method == "RoIAlign":
        pooled = torchvision.ops.roi_align(feat, boxes, 5, 1 / 16, 0)
    else:
        pooled = torchvision.ops.roi_pool(feat, boxes, 5, 1 / 16)
    tv = TwoMLPHead(6 * 25, 16)
    _copy_mlp(head, tv)
    torch.testing.assert_close(head(feat, boxes), tv(pooled), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head([feat], boxes), tv(pooled), rtol=1e-4, atol=1e-5)


def test_roi_2mlp_head_init_empty_and_gradients():
    head = Roi2MLPHead(4, SCALES, mlp_dim=64)
    bound = (3.0 / (4 * 49)) ** 0.5
    w = head.fc6.weight.detach().abs().max()
    assert float(w) <= bound and float(w) > 0.9 * bound
    assert float(head.fc6.bias.detach().abs().sum()) == 0 and float(head.fc7.bias.detach().abs().sum()) == 0

    feats = [f.requires_grad_() for f in _pyramid()]
    assert head(feats, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 64)
    assert head(feats, torch.zeros(0, 5)).shape == (0, 64)
    out = head(feats, [_boxes(20), _boxes(20)])
    out.pow(2).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(float(f.grad.abs().sum()) > 0 for f in feats[:4])


def test_roi_2mlp_head_rejects_bad_inputs():
    with pytest.raises(ValueError, match="RoIPoolF"):
        Roi2MLPHead(4, SCALES, roi_xform="RoIPoolF")
    with pytest.raises(ValueError, match="roi_xform"):
        Roi2MLPHead(4, SCALES, roi_xform="RoIWarp")
    head = Roi2MLPHead(4, SCALES, mlp_dim=8)
    with pytest.raises(ValueError, match="needs 4"):
        head(_pyramid()[:2], [_boxes(2), _boxes(2)])
    with pytest.raises(ValueError, match="'rois'"):
        head(_pyramid(), {"boxes": torch.zeros(0, 5)})
    with pytest.raises(ValueError, match=r"\(R, 5\)"):
        head(_pyramid(), torch.zeros(3, 4))


def _small_c4(**kw):
    args = dict(in_channels=16, resolution=14, sampling_ratio=0, spatial_scale=1 / 16, width_per_group=2,
                norm="FrozenBN", out_channels=32)
    args.update(kw)
    return ResNetRoIConv5Head(**args)


def _c4_rois():
    return [_boxes(5, hi=150.0, size=160.0), _boxes(3, hi=150.0, size=160.0)]


def test_c4_head_shapes_structure_and_computation():
    head = _small_c4()
    feat = torch.randn(2, 16, 10, 10)
    boxes = _c4_rois()
    stage = head.res5
    assert len(stage) == 3 and all(isinstance(b, BottleneckBlock) for b in stage)
    # stride_in_1x1: conv1's input is subsampled (resnet.py's docstring)
    assert stage[0].input_stride == 2 and stage[0].conv1.stride == (1, 1) and stage[0].conv2.stride == (1, 1)
    assert stage[0].conv1.out_channels == 16 and stage[0].downsample is not None
    assert isinstance(stage[0].bn1, FrozenBatchNorm2d)
    feat_out, res5 = head(feat, boxes, return_res5=True)
    assert feat_out.shape == (8, 32) and res5.shape == (8, 32, 7, 7) and head.out_channels == 32
    pooled = torchvision.ops.roi_align(feat, boxes, 14, 1 / 16, 0)
    expected_map = head.res5(pooled)
    torch.testing.assert_close(res5, expected_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feat_out, torch.nn.functional.avg_pool2d(expected_map, 7).flatten(1),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head(feat, boxes), feat_out)
    torch.testing.assert_close(head([feat], {"rois": as_rois(boxes).numpy()}), feat_out)


def test_c4_head_dilation_keeps_resolution_and_stride_in_3x3():
    head = _small_c4(dilation=2, stride_in_1x1=False)
    assert head.res5[0].conv1.stride == (1, 1) and head.res5[0].conv2.stride == (1, 1)
    assert head.res5[0].conv2.dilation == (2, 2)
    _, res5 = head(torch.randn(2, 16, 10, 10), _c4_rois(), return_res5=True)
    assert res5.shape == (8, 32, 14, 14)
    head = _small_c4(stride_in_1x1=False)
    assert head.res5[0].conv1.stride == (1, 1) and head.res5[0].conv2.stride == (2, 2)


def test_c4_head_empty_and_gradients():
    head = _small_c4()
    feat = torch.randn(2, 16, 10, 10, requires_grad=True)
    out, res5 = head(feat, [torch.zeros(0, 4), torch.zeros(0, 4)], return_res5=True)
    assert out.shape == (0, 32) and res5.shape == (0, 32, 7, 7)
    head(feat, _c4_rois()).pow(2).sum().backward()
    params = dict(head.named_parameters())
    assert len(params) == 10  # 3 blocks x 3 convs + the projection (FrozenBN has no parameters)
    for name, p in params.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(feat.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="one feature map"):
        head([feat, feat], _c4_rois())


def test_from_cfg_and_build_box_head():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FAST_RCNN.ROI_BOX_HEAD",
                         "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
                         "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 2, "FAST_RCNN.MLP_HEAD_DIM", 24,
                         "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"])
    assert_and_infer_cfg(cfg)
    head = build_box_head(cfg, 4, [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64])
    assert isinstance(head, Roi2MLPHead) and head.out_channels == 24
    assert head.feature_indices == [0, 1, 2, 3] and head.roi_xform.scales == SCALES
    assert head.roi_xform.sampling_ratio == 2 and head.roi_xform.output_size == (7, 7)
    assert head(_pyramid(), [_boxes(3), _boxes(2)]).shape == (5, 24)

    cfg = get_cfg()  # defaults: R-50-C4, ResNet_roi_conv5_head, RoIAlign 14, sampling 0
    cfg.merge_from_list(["RESNETS.WIDTH_PER_GROUP", 2])
    assert_and_infer_cfg(cfg)
    head = build_box_head(cfg, 16, [1 / 16])
    assert isinstance(head, ResNetRoIConv5Head) and head.out_channels == 32
    assert head.roi_xform.output_size == (14, 14) and head.roi_xform.sampling_ratio == 0
    assert head.roi_xform.spatial_scale == 1 / 16 and len(head.res5) == 3
    assert head(torch.randn(1, 16, 6, 6), [torch.tensor([[0.0, 0.0, 60.0, 50.0]])]).shape == (1, 32)
    with pytest.raises(ValueError, match="single-level"):
        ResNetRoIConv5Head.from_cfg(cfg, 16, SCALES)
