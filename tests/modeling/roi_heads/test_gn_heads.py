"""Detectron's GroupNorm heads: roi_Xconv1fc(_gn)_head (box) and mask_rcnn_fcn_head_v1up4convs_gn (mask)."""
import pytest
import torch
from torch import nn

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.roi_heads.box_head import RoiXconv1fcHead, build_box_head
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNFCNHead, build_mask_head

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _feats(c=64):
    torch.manual_seed(0)
    return [torch.randn(2, c, 64 // 2 ** i, 64 // 2 ** i) for i in range(5)]


def _rois():
    return [torch.tensor([[4.0, 4, 60, 50], [10, 20, 30, 40]]), torch.tensor([[0.0, 0, 100, 120]])]


def test_xconv1fc_gn_head_layout_and_output():
    head = RoiXconv1fcHead(64, SCALES, resolution=7, num_convs=4, conv_dim=32, mlp_dim=48, use_gn=True)
    names = [n for n, _ in head.named_parameters()]
    assert names == [f"head_conv{i}{s}" for i in range(1, 5) for s in (".weight", "_gn.weight", "_gn.bias")] + \
        ["fc6.weight", "fc6.bias"]
    assert all(isinstance(getattr(head, f"head_conv{i}_gn"), nn.GroupNorm) for i in range(1, 5))
    assert head.fc6.in_features == 32 * 49
    out = head(_feats(), _rois())
    assert out.shape == (3, 48) and (out >= 0).all()
    plain = RoiXconv1fcHead(64, SCALES, num_convs=2, conv_dim=32, mlp_dim=48)
    assert plain.head_conv1.bias is not None and not hasattr(plain, "head_conv1_gn")


def test_v1up4convs_gn_mask_head_layout_and_output():
    head = MaskRCNNFCNHead(64, SCALES, resolution=14, num_convs=4, dim=32, use_gn=True)
    assert head.mask_fcn1.bias is None and isinstance(head.mask_fcn4_gn, nn.GroupNorm)
    assert head(_feats(), _rois()).shape == (3, 32, 28, 28)
    plain = MaskRCNNFCNHead(64, SCALES, resolution=14, num_convs=4, dim=32)
    assert plain.mask_fcn1.bias is not None and not hasattr(plain, "mask_fcn1_gn")


def _gn_cfg():
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body", "MODEL.NUM_CLASSES", 4, "RESNETS.NORM", "GN",
        "RESNETS.FREEZE_AT", 0, "FPN.USE_GN", True, "FPN.DIM", 32,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_Xconv1fc_gn_head", "FAST_RCNN.NUM_STACKED_CONVS", 2,
        "FAST_RCNN.CONV_HEAD_DIM", 32, "FAST_RCNN.MLP_HEAD_DIM", 64, "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
        "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs_gn", "MRCNN.DIM_REDUCED", 32,
        "MRCNN.RESOLUTION", 28, "MRCNN.ROI_XFORM_RESOLUTION", 14, "MRCNN.DILATION", 1, "TRAIN.SCALES", "(64,)", "TRAIN.MAX_SIZE", 64,
        "TEST.SCALE", 64, "TEST.MAX_SIZE", 64,
    ])
    return cfg


def test_gn_heads_from_cfg_train_and_infer():
    cfg = _gn_cfg()
    assert build_box_head(cfg, 32, SCALES + [1 / 64]).use_gn
    assert build_mask_head(cfg, 32, SCALES + [1 / 64]).use_gn
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10, 50, 40]]), "labels": torch.tensor([2]), "masks": masks}]
    losses = model([torch.rand(3, 64, 64)], targets)
    sum(losses.values()).backward()
    assert model.Box_Head.head_conv2_gn.weight.grad is not None
    assert model.Mask_Head.mask_fcn1_gn.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}
