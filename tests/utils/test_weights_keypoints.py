"""Keypoint R-CNN weights in the zoo formats: Detectron ``.pkl`` blobs (``conv_fcn{i}``, ``kps_score_lowres``; the
fixed ``kps_score`` bilinear kernel dropped), detectron2 (``roi_heads.keypoint_head.conv_fcn{i}`` /
``score_lowres``) and Detectron.pytorch (``Keypoint_Head.conv_fcn.{2i}``, ``Keypoint_Outs.classify``; its fixed
``upsample.upconv`` dropped). Each file, written from a seeded keypoint model under the project's own names, loads
through ``load_ckpt`` into a fresh model that then computes the same keypoints."""
import os
import pickle

import numpy as np
import pytest
import torch

from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.checkpoint import load_ckpt
from maskrcnn.utils.weights.detectron import canonical_to_detectron, detectron_to_canonical
from maskrcnn.utils.weights.detectron2 import canonical_to_detectron2
from maskrcnn.utils.weights.detectron_pytorch import canonical_to_detectron_pytorch
from maskrcnn.utils.weights.ours import ours_to_canonical
from tests.modeling.test_generalized_rcnn import small_cfg

KPS = {"MODEL.MASK_ON": False, "MODEL.KEYPOINTS_ON": True, "KRCNN.NUM_KEYPOINTS": 4, "KRCNN.NUM_STACKED_CONVS": 3,
       "KRCNN.CONV_HEAD_DIM": 16, "KRCNN.ROI_XFORM_RESOLUTION": 7, "KRCNN.HEATMAP_SIZE": 28,
       "KRCNN.KEYPOINT_NAMES": ["nose", "left_eye", "right_eye", "tail"], "RESNETS.NORM": "FrozenBN",
       "TEST.DETECTIONS_PER_IM": 10}


def _model(seed: int) -> Generalized_RCNN:
    torch.manual_seed(seed)
    model = Generalized_RCNN(small_cfg("fpn", **KPS)).eval()
    with torch.no_grad():  # FrozenBN statistics away from identity, so that BN folding is exercised
        for name, b in model.named_buffers():
            if name.endswith(("running_var", "running_mean")):
                b.copy_(torch.rand_like(b) * 0.5 + (0.75 if name.endswith("var") else -0.25))
    return model


def _write(fmt: str, canonical, tmp_path) -> str:
    if fmt == "detectron":
        blobs = {k: np.asarray(v) for k, v in canonical_to_detectron(canonical).items()}
        blobs["kps_score_w"] = np.ones((4, 4, 4, 4), np.float32)  # Detectron's fixed bilinear kernel: dropped
        blobs["kps_score_b"] = np.zeros((4,), np.float32)
        path = os.path.join(tmp_path, "model_final.pkl")
        with open(path, "wb") as f:
            pickle.dump({"blobs": blobs}, f)
        return path
    if fmt == "detectron2":
        path = os.path.join(tmp_path, "model_final.pth")
        torch.save({"model": canonical_to_detectron2(canonical), "__author__": "test"}, path)
        return path
    sd = canonical_to_detectron_pytorch(canonical)
    sd["Keypoint_Outs.upsample.upconv.weight"] = torch.ones(4, 4, 4, 4)
    sd["Keypoint_Outs.upsample.upconv.bias"] = torch.zeros(4)
    path = os.path.join(tmp_path, "model_step1.pth")
    torch.save({"model": sd, "step": 1}, path)
    return path


def test_published_names():
    canonical = ours_to_canonical(_model(0).state_dict())
    assert {"conv_fcn1_w", "conv_fcn3_b", "kps_score_lowres_w", "kps_score_lowres_b"} <= set(
        canonical_to_detectron(canonical))
    assert {"roi_heads.keypoint_head.conv_fcn1.weight", "roi_heads.keypoint_head.conv_fcn3.bias",
            "roi_heads.keypoint_head.score_lowres.weight"} <= set(canonical_to_detectron2(canonical))
    assert {"Keypoint_Head.conv_fcn.0.weight", "Keypoint_Head.conv_fcn.4.bias",
            "Keypoint_Outs.classify.weight"} <= set(canonical_to_detectron_pytorch(canonical))
    back, _ = detectron_to_canonical({"blobs": {"kps_score_w": np.ones(1), **{
        k: np.asarray(v) for k, v in canonical_to_detectron(canonical).items()}}})
    assert "kps.score_lowres.weight" in back and not any(k.startswith("kps.score.") for k in back)


@pytest.mark.parametrize("fmt", ["detectron", "detectron2", "detectron.pytorch"])
@torch.no_grad()
def test_keypoint_checkpoints_load_and_compute_the_same_keypoints(fmt, tmp_path):
    source = _model(0)
    path = _write(fmt, ours_to_canonical(source.state_dict()), tmp_path)
    target = _model(1)
    load_ckpt(target, path)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 80, 100, generator=g), torch.rand(3, 90, 70, generator=g)]
    want, got = source(images), target(images)
    for w, o in zip(want, got):
        assert w["boxes"].shape[0] > 0 and w["keypoints"].shape == o["keypoints"].shape
        torch.testing.assert_close(o["boxes"], w["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(o["keypoints"], w["keypoints"], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(o["keypoints_scores"], w["keypoints_scores"], rtol=1e-3, atol=1e-3)
