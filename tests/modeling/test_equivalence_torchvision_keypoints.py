"""Our Generalized_RCNN with configs/torchvision/keypoint_rcnn_R_50_FPN.yaml and converted weights is the same
network as torchvision's keypointrcnn_resnet50_fpn: keypoint head logits for given RoIs, then the final detections
and keypoints, on a real photo of ../shared/data (Penn-Fudan pedestrians) and a random image.

Weights are seeded random (weights=None, weights_backbone=None: no pretrained weights exist here); BatchNorm
statistics are randomised so that the BatchNorm -> FrozenBN conversion is exercised. As in
test_equivalence_torchvision.py, the RPN and box score layers are scaled up so that detection scores are well
separated (random detectors are otherwise chaotic at NMS, where near-equal scores flip with any reordering of float
sums).
"""
import os

import cv2
import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.weights.formats import convert_to_ours

pytestmark = pytest.mark.slow  # builds two R-50-FPN keypoint models

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
    tv = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                min_size=SCALE, max_size=MAX_SIZE)
    _randomise_bn(tv, torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Well-separated scores for the end-to-end comparison (see module docstring).
        tv.rpn.head.cls_logits.weight.mul_(4.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(2.0)
        # Two classes: with random weights the person logit loses to the background on nearly every RoI; this
        # offset lets ~5% of the RoIs through TEST.SCORE_THRESH, with person-minus-background logits spread over
        # about -3..+16 (scores 0.05..1 - 1e-7, distinct in float32).
        tv.roi_heads.box_predictor.cls_score.bias[1] += 12.0
    tv.eval()
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "torchvision", "keypoint_rcnn_R_50_FPN.yaml"))
    cfg.merge_from_list(["TEST.SCALE", SCALE, "TEST.MAX_SIZE", MAX_SIZE, "TRAIN.SCALES", f"({SCALE},)",
                         "TRAIN.MAX_SIZE", MAX_SIZE, "OPS_BACKEND", "torchvision"])
    ours = Generalized_RCNN(cfg)
    state, _notes = convert_to_ours(tv.state_dict(), fmt="torchvision", cfg=cfg, model=ours)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    return tv, ours


@pytest.fixture(scope="module")
def images():
    from tests.conftest import SHARED_DATA
    path = os.path.join(SHARED_DATA, "PennFudanPed-sample", "PNGImages", "FudanPed00001.png")
    bgr = cv2.imread(path)
    assert bgr is not None, f"cannot read {path}"
    photo = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0
    return [photo, torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(3))]


@torch.no_grad()
def test_keypoint_head_logits_equal(models, images):
    tv, ours = models
    il, _ = ours.preprocess(images)
    tv_feats = list(tv.backbone(il.tensors).values())
    g = torch.Generator().manual_seed(5)
    rois = []
    for h, w in il.image_sizes:
        xy = torch.rand(10, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(10, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 4
        rois.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1))
    fmap = dict(zip(["0", "1", "2", "3", "pool"], tv_feats))
    logits = ours.Keypoint_Outs(ours.Keypoint_Head(tv_feats, rois))
    tv_logits = tv.roi_heads.keypoint_predictor(tv.roi_heads.keypoint_head(
        tv.roi_heads.keypoint_roi_pool(fmap, rois, il.image_sizes)))
    assert logits.shape == tv_logits.shape == (20, 17, 56, 56)
    scale = tv_logits.abs().max()
    torch.testing.assert_close(logits / scale, tv_logits / scale, rtol=0, atol=1e-5)


@torch.no_grad()
def test_final_keypoints_equal(models, images):
    tv, ours = models
    out = ours(images)
    ref = tv(images)
    compared = 0
    for a, b in zip(out, ref):
        assert a["boxes"].shape[0] == b["boxes"].shape[0] > 0
        assert torch.equal(a["labels"], b["labels"])
        # Person-minus-background logits reach ~100 here: fp32 rounding of the features (~1e-6 relative) moves a
        # mid-range score by up to ~1e-4 (measured 8.8e-5).
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=2e-4)
        # The same rounding moves the box coordinates by ~1e-5 of the image size: up to 2e-3 px measured on an AVX2
        # CPU, 8.2e-3 px on an AVX-512 one (whose kernels sum in another order); 1/100 px bounds both.
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-2)
        assert a["keypoints"].shape == b["keypoints"].shape == (b["boxes"].shape[0], 17, 3)
        # Keypoints are read from the 56x56 heatmap resized to ceil(w) x ceil(h) of the box. For a box only a few
        # pixels wide, w is the difference of two coordinates ~100x larger, so their rounding is ~1e-3 of w (the
        # noise image has a 2.6 x 207 px one: its keypoint scores differed by 1.5e-4 of the scale and one arg-max
        # moved along the 207 px side on an AVX-512 CPU). Compare the keypoints of boxes of at least 8 px a side.
        wh = b["boxes"][:, 2:] - b["boxes"][:, :2]
        sized = (wh >= 8).all(1)
        compared += int(sized.sum())
        # Same arg-max cells (a different one moves a keypoint by >= 1 px): the coordinates differ as the boxes do.
        torch.testing.assert_close(a["keypoints"][sized], b["keypoints"][sized], rtol=1e-4, atol=1e-2)
        scale = b["keypoints_scores"].abs().max()
        torch.testing.assert_close(a["keypoints_scores"][sized] / scale, b["keypoints_scores"][sized] / scale, rtol=0,
                                   atol=1e-4)
    assert compared >= 20, compared  # most of the noise image's random boxes are thinner than 8 px: the photo's count
