"""Our Generalized_RCNN with configs/torchvision/e2e_mask_rcnn_R-50-FPN.yaml and converted weights is the same
network as torchvision's maskrcnn_resnet50_fpn: compared stage by stage on images of several sizes.

Weights are seeded random (no pretrained weights exist here); BatchNorm statistics are randomised too so that
the FrozenBN conversion is exercised. For the end-to-end comparison the score layers are scaled up so that
detection scores are well separated: random detectors are otherwise chaotic at NMS, where near-equal scores
flip with any reordering of float sums.
"""
import os

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList as TVImageList
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.weights.formats import convert_to_ours

pytestmark = pytest.mark.slow  # builds two R-50-FPN models; CI runs it, `make test-quick` skips it

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCALE, MAX_SIZE = 320, 512


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
            n = m.weight.shape[0]
            m.weight.data = torch.rand(n, generator=gen) * 0.5 + 0.75
            m.bias.data = torch.rand(n, generator=gen) * 0.2 - 0.1
            m.running_mean.data = torch.rand(n, generator=gen) * 0.2 - 0.1
            m.running_var.data = torch.rand(n, generator=gen) * 0.5 + 0.75


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    # Built as maskrcnn_resnet50_fpn builds its pretrained model: FrozenBN, stem and res2 frozen.
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    tv = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, min_size=SCALE, max_size=MAX_SIZE)
    _randomise_bn(tv, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Well-separated scores for the end-to-end comparison (see module docstring).
        tv.rpn.head.cls_logits.weight.mul_(4.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(8.0)
    tv.eval()
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "torchvision", "e2e_mask_rcnn_R-50-FPN.yaml"))
    cfg.merge_from_list(["TEST.SCALE", SCALE, "TEST.MAX_SIZE", MAX_SIZE, "TRAIN.SCALES", f"({SCALE},)",
                         "TRAIN.MAX_SIZE", MAX_SIZE, "OPS_BACKEND", "torchvision"])
    ours = Generalized_RCNN(cfg)
    assert ours.ops_backend == "torchvision"  # its nms/roi_align run torchvision's kernels (see test_ops_backend.py)
    state, _notes = convert_to_ours(tv.state_dict(), fmt="torchvision", cfg=cfg)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    return tv, ours


def _images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g),
            torch.rand(3, 333, 517, generator=g)]


def _close(a, b, rtol=1e-4, atol=1e-4):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@torch.no_grad()
def test_stage_by_stage(models):
    tv, ours = models
    images = _images()
    # 1. preprocessed batch
    il, _ = ours.preprocess(images)
    tv_il, _ = tv.transform(images)
    assert il.image_sizes == [tuple(s) for s in tv_il.image_sizes]
    _close(il.tensors, tv_il.tensors, rtol=0, atol=1e-6)
    # 2. every FPN level
    feats = ours.Conv_Body(il.tensors)
    tv_feats = list(tv.backbone(tv_il.tensors).values())
    assert len(feats) == len(tv_feats) == 5
    for a, b in zip(feats, tv_feats):
        scale = b.abs().max()
        _close(a / scale, b / scale, rtol=0, atol=1e-5)
    # 3. RPN objectness and deltas
    obj, deltas = ours.RPN.head(feats)
    tv_obj, tv_deltas = tv.rpn.head(tv_feats)
    for a, b in zip(obj + deltas, tv_obj + tv_deltas):
        scale = b.abs().max()
        _close(a / scale, b / scale, rtol=0, atol=1e-5)
    # 4. box logits/deltas and mask logits for the same given RoIs (torchvision features for both: per-stage check)
    g = torch.Generator().manual_seed(5)
    rois = []
    for h, w in il.image_sizes:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 4
        rois.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1))
    fmap = {k: v for k, v in zip(["0", "1", "2", "3", "pool"], tv_feats)}
    box_feat = ours.Box_Head(tv_feats, rois)
    cls, reg = ours.Box_Outs(box_feat)
    tv_box = tv.roi_heads.box_head(tv.roi_heads.box_roi_pool(fmap, rois, il.image_sizes))
    tv_cls, tv_reg = tv.roi_heads.box_predictor(tv_box)
    _close(cls, tv_cls)
    _close(reg, tv_reg)
    mask_logits = ours.Mask_Outs(ours.Mask_Head(tv_feats, rois))
    tv_mask = tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(tv.roi_heads.mask_roi_pool(fmap, rois,
                                                                                              il.image_sizes)))
    scale = tv_mask.abs().max()
    _close(mask_logits / scale, tv_mask / scale, rtol=0, atol=1e-5)


@torch.no_grad()
def test_rpn_proposals_equal(models):
    tv, ours = models
    images = _images()[:2]
    il, _ = ours.preprocess(images)
    feats = ours.Conv_Body(il.tensors)
    proposals, _ = ours.RPN(feats, il.image_sizes, None)
    tv_props, _ = tv.rpn(TVImageList(il.tensors, il.image_sizes), {k: v for k, v in zip(
        ["0", "1", "2", "3", "pool"], feats)})
    for a, b in zip(proposals, tv_props):
        assert a.shape == b.shape
        _close(a, b, rtol=1e-5, atol=1e-3)


@torch.no_grad()
def test_final_detections_equal(models):
    tv, ours = models
    images = _images()
    out = ours(images)
    ref = tv(images)
    for a, b in zip(out, ref):
        assert a["boxes"].shape[0] == b["boxes"].shape[0] > 0
        assert torch.equal(a["labels"], b["labels"])
        _close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
        _close(a["boxes"], b["boxes"], rtol=1e-4, atol=2e-3)
        _close(a["masks"], b["masks"], rtol=1e-3, atol=2e-3)
