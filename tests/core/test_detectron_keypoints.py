"""Keypoints through Detectron's API (maskrcnn/core/test.py) on a tiny seeded Keypoint R-CNN: ``im_detect_all``
returns ``cls_keyps`` in ``cls_boxes``' order as Detectron's ``(4, K)`` rows (x, y, logit, prob), the keypoints
and scores of the model's own forward; ``TEST.KPS_AUG`` without augmentations changes nothing; ``vis_one_image`` draws them."""
import numpy as np
import torch

from maskrcnn.config import assert_and_infer_cfg
from maskrcnn.core.test import im_detect_all, keypoint_results
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.vis import vis_one_image
from tests.modeling.test_generalized_rcnn import small_cfg

KPS = {"MODEL.MASK_ON": False, "MODEL.KEYPOINTS_ON": True, "KRCNN.NUM_KEYPOINTS": 4, "KRCNN.NUM_STACKED_CONVS": 2,
       "KRCNN.CONV_HEAD_DIM": 16, "KRCNN.ROI_XFORM_RESOLUTION": 7, "KRCNN.HEATMAP_SIZE": 28,
       "KRCNN.KEYPOINT_NAMES": ["nose", "left_eye", "right_eye", "tail"], "TEST.SCORE_THRESH": 0.0,
       "TEST.DETECTIONS_PER_IM": 12}


def _model(**extra):
    torch.manual_seed(0)
    return Generalized_RCNN(assert_and_infer_cfg(small_cfg("fpn", **{**KPS, **extra}))).eval()


def _bgr():
    rng = np.random.default_rng(4)
    return (rng.random((80, 100, 3)) * 255).astype(np.uint8)


def test_im_detect_all_returns_detectron_keypoint_rows_close_to_the_forward():
    model = _model()
    im = _bgr()
    cls_boxes, cls_segms, cls_keyps = im_detect_all(model, im)
    assert cls_segms is None and len(cls_keyps) == len(cls_boxes) and cls_keyps[0] == []
    for boxes, kps in zip(cls_boxes[1:], cls_keyps[1:]):
        assert len(kps) == len(boxes)
        for b, k in zip(boxes, kps):
            assert k.shape == (4, 4) and k.dtype == np.float32
            assert (k[0] >= b[0] - 1e-3).all() and (k[0] <= max(b[2], b[0] + 1) + 1e-3).all()
            assert ((k[3] > 0) & (k[3] <= 1)).all()
    rgb = torch.from_numpy(im[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        out = model([rgb])[0]
    ours = np.concatenate([np.stack(k) for k in cls_keyps[1:] if len(k)])
    boxes = np.concatenate([b for b in cls_boxes[1:] if len(b)])
    # Same detections (Detectron's order is class-major): match them by box.
    for box, k in zip(boxes, ours):
        i = int(torch.argmin((out["boxes"] - torch.from_numpy(box[:4])).abs().sum(1)))
        assert torch.allclose(out["boxes"][i], torch.from_numpy(box[:4]), atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(k[:2].T.copy()), out["keypoints"][i, :, :2], rtol=0, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(k[2].copy()), out["keypoints_scores"][i], rtol=0, atol=1e-3)


def test_kps_aug_without_augmentations_is_the_plain_path_and_vis_draws_them(tmp_path):
    im = _bgr()
    plain = im_detect_all(_model(), im)[2]
    aug = im_detect_all(_model(**{"TEST.KPS_AUG.ENABLED": True}), im)[2]
    for a, b in zip(plain[1:], aug[1:]):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    flip = im_detect_all(_model(**{"TEST.KPS_AUG.ENABLED": True, "TEST.KPS_AUG.H_FLIP": True}), im)[2]
    assert [len(k) for k in flip] == [len(k) for k in plain]
    cls_boxes = im_detect_all(_model(), im)[0]
    vis_one_image(im[:, :, ::-1], "kps", str(tmp_path), cls_boxes, None, plain, thresh=0.0, ext="png")
    assert (tmp_path / "kps.png").exists()


def test_keypoint_results_of_no_boxes():
    empty = [np.zeros((0, 5), np.float32)] * 3
    assert keypoint_results(empty, np.zeros((0, 4, 28, 28), np.float32), np.zeros((0, 5), np.float32)) == [[], [], []]
