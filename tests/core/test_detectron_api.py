"""The Detectron.pytorch inference walkthrough, run as written with our names (R-50-C4 config, global cfg)."""
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import assert_and_infer_cfg, cfg, cfg_from_file, cfg_from_list, reset_global_cfg
from maskrcnn.core.test import (box_results_with_nms_and_limit, im_detect_all, im_detect_bbox, im_detect_mask,
                                segm_results)
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.checkpoint import load_ckpt
from maskrcnn.utils.vis import get_coco_dataset, vis_one_image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def c4_model(tmp_path):
    reset_global_cfg()
    cfg_from_file(os.path.join(REPO, "configs", "baselines", "e2e_mask_rcnn_R-50-C4_1x.yaml"))
    # Small enough for a CPU test; everything else is the published config.
    cfg_from_list(["TEST.SCALE", "160", "TEST.MAX_SIZE", "224", "TEST.RPN_PRE_NMS_TOP_N", "500",
                   "TEST.RPN_POST_NMS_TOP_N", "40", "TEST.SCORE_THRESH", "0.0"])
    assert_and_infer_cfg()
    torch.manual_seed(0)
    model = Generalized_RCNN()
    with torch.no_grad():
        # A random R-50 with FrozenBN gives RPN logits of +-300: probabilities saturate to exactly 0/1 and tie,
        # so top-N by probability (RPN_GenerateProposals' input) could not reproduce top-N by logit. Scaling the
        # objectness layer keeps scores distinct without changing what is being tested (the plumbing).
        model.RPN.RPN_cls_score.weight.mul_(1e-3)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    fresh = Generalized_RCNN()
    load_ckpt(fresh, str(ckpt))
    fresh.eval()
    yield fresh
    reset_global_cfg()


def test_walkthrough_im_detect_all_and_vis(c4_model, shared_data, tmp_path):
    im = cv2.imread(os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", "FudanPed00001.png"))
    assert im is not None and im.dtype == np.uint8
    cls_boxes, cls_segms, cls_keyps = im_detect_all(c4_model, im)
    assert len(cls_boxes) == cfg.MODEL.NUM_CLASSES == 81 and cls_keyps is None
    assert cls_boxes[0].shape == (0, 5)
    n = sum(len(b) for b in cls_boxes[1:])
    assert 0 < n <= cfg.TEST.DETECTIONS_PER_IM
    for j in range(1, 81):
        assert len(cls_segms[j]) == len(cls_boxes[j])
        for rle in cls_segms[j]:
            assert tuple(rle["size"]) == im.shape[:2]
    out = vis_one_image(im[:, :, ::-1], "FudanPed00001.png", str(tmp_path), cls_boxes, cls_segms, cls_keyps,
                        dataset=get_coco_dataset(), box_alpha=0.3, show_class=True, thresh=0.0, ext="png")
    drawn = cv2.imread(out)
    assert drawn.shape == im.shape and not np.array_equal(drawn, im)


def test_walkthrough_step_by_step_equals_im_detect_all(c4_model, shared_data):
    im = cv2.imread(os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", "PennPed00003.png"))
    scores, boxes, im_scale, blob_conv = im_detect_bbox(c4_model, im, cfg.TEST.SCALE, cfg.TEST.MAX_SIZE)
    assert scores.shape[1] == 81 and boxes.shape == (scores.shape[0], 4 * 81)
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    assert im_scale == pytest.approx(160 / min(im.shape[:2]), rel=1e-6) or im_scale == pytest.approx(
        224 / max(im.shape[:2]), rel=1e-6)
    scores, boxes, cls_boxes = box_results_with_nms_and_limit(scores, boxes)
    masks = im_detect_mask(c4_model, im_scale, boxes, blob_conv)
    assert masks.shape == (boxes.shape[0], 81, 14, 14)
    cls_segms = segm_results(cls_boxes, masks, boxes, im.shape[0], im.shape[1])
    ref_boxes, ref_segms, _ = im_detect_all(c4_model, im)
    for j in range(81):
        np.testing.assert_allclose(cls_boxes[j], ref_boxes[j], rtol=1e-5, atol=1e-4)
        assert [s["counts"] for s in cls_segms[j]] == [s["counts"] for s in ref_segms[j]]


def test_walkthrough_forward_by_hand(c4_model, shared_data):
    """Conv_Body -> RPN.RPN_conv / RPN_cls_score / RPN_bbox_pred -> RPN_GenerateProposals -> Box_Head -> Box_Outs."""
    model = c4_model
    im = cv2.imread(os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", "FudanPed00002.png"))
    x = torch.from_numpy(im[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0
    image_list, _ = model.preprocess([x])
    im_info = image_list.im_info
    assert im_info.shape == (1, 3)

    blob_conv = model.Conv_Body(image_list.tensors)
    assert blob_conv.shape[1] == 1024  # res4, stride 16
    rpn_conv = F.relu(model.RPN.RPN_conv(blob_conv))
    rpn_cls_score = model.RPN.RPN_cls_score(rpn_conv)
    rpn_bbox_pred = model.RPN.RPN_bbox_pred(rpn_conv)
    assert rpn_cls_score.shape[1] == 15 and rpn_bbox_pred.shape[1] == 60  # 5 sizes x 3 ratios
    rpn_cls_prob = torch.sigmoid(rpn_cls_score)
    rois, roi_probs = model.RPN.RPN_GenerateProposals(rpn_cls_prob, rpn_bbox_pred, im_info)
    assert rois.shape[1] == 5 and 0 < rois.shape[0] <= cfg.TEST.RPN_POST_NMS_TOP_N
    assert (rois[:, 0] == 0).all() and roi_probs.shape == (rois.shape[0],)

    rpn_ret = {"rois": rois}
    box_feat = model.Box_Head(blob_conv, rpn_ret)
    cls_score, bbox_pred = model.Box_Outs(box_feat)
    assert cls_score.shape == (rois.shape[0], 81) and bbox_pred.shape == (rois.shape[0], 4 * 81)

    # The same numbers as the model's own path on the same proposals.
    proposals, _ = model.RPN(blob_conv, image_list.image_sizes, None)
    torch.testing.assert_close(proposals[0], rois[:, 1:])
    ref = model.Box_Head(blob_conv, proposals)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(model.Box_Outs(ref)[0], cls_score)


def test_segm_results_rle_matches_binarised_paste():
    from maskrcnn.config import get_cfg
    cfg_local = get_cfg()
    cls_boxes = [np.zeros((0, 5), np.float32), np.array([[2, 3, 12, 14, 0.9]], np.float32),
                 np.array([[5, 5, 20, 18, 0.8]], np.float32)]
    masks = np.zeros((2, 3, 14, 14), np.float32)
    masks[0, 1] = 1.0
    masks[1, 2, 3:10, 3:10] = 1.0
    boxes = np.vstack([cls_boxes[1][:, :4], cls_boxes[2][:, :4]])
    segms = segm_results(cls_boxes, masks, boxes, 24, 30, cfg_local)
    m1 = mask_util.decode(segms[1][0])
    assert m1.shape == (24, 30) and m1[5:12, 4:10].all() and m1[:, 20:].sum() == 0
    m2 = mask_util.decode(segms[2][0])
    assert 0 < m2.sum() < 15 * 13


def test_segm_results_follows_the_paste_method():
    """With TEST.MASK_PASTE_METHOD detectron2 the Detectron walk pastes as the model's forward does (float box,
    grid_sample), not with the integer box of torchvision's paste."""
    from maskrcnn.config import get_cfg
    from maskrcnn.ops.grid_paste import paste_masks_grid_sample
    from maskrcnn.ops.masks import paste_masks_in_image

    cls_boxes = [np.zeros((0, 5), np.float32), np.array([[2.4, 3.6, 7.7, 9.2, 0.9], [11.5, 4.2, 14.1, 7.9, 0.7]],
                                                        np.float32)]
    masks = np.random.default_rng(0).uniform(0, 1, (2, 2, 14, 14)).astype(np.float32)
    boxes = cls_boxes[1][:, :4]
    per_box = torch.from_numpy(masks[:, 1:2].copy())
    for method, paste in (("detectron2", lambda: paste_masks_grid_sample(per_box, torch.from_numpy(boxes), (16, 20))),
                          ("torchvision", lambda: paste_masks_in_image(per_box, torch.from_numpy(boxes), (16, 20)))):
        cfg_local = get_cfg()
        cfg_local.TEST.MASK_PASTE_METHOD = method
        segms = segm_results(cls_boxes, masks, boxes, 16, 20, cfg_local)
        expected = (paste()[:, 0] > 0.5).numpy().astype(np.uint8)
        for k in range(2):
            np.testing.assert_array_equal(mask_util.decode(segms[1][k]), expected[k])
