"""Detectron's inference API over the same modules as ``Generalized_RCNN.forward``.

Images are BGR ``uint8`` arrays of shape ``(H, W, 3)`` as ``cv2.imread`` returns them. Box arrays are numpy
``float32`` in original-image pixels (x1, y1, x2, y2); ``cls_boxes[j]`` is ``(n_j, 5)`` ``[x1, y1, x2, y2, score]``
for class ``j`` (index 0, the background, stays empty), and ``cls_segms[j]`` the matching COCO RLEs.

Typical use, as in Detectron.pytorch's ``infer_simple.py``::

    cfg_from_file("configs/baselines/e2e_mask_rcnn_R-50-C4_1x.yaml"); assert_and_infer_cfg()
    model = Generalized_RCNN(); load_ckpt(model, "model.pth"); model.eval()
    cls_boxes, cls_segms, cls_keyps = im_detect_all(model, cv2.imread("img.jpg"))

Settings (``TEST.SCALE``, ``TEST.NMS``, ...) are read from ``model.cfg``, which the model copied from the config it
was built with.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

from ..ops.boxes import clip_boxes_to_image
from ..ops.masks import paste_masks_in_image
from ..ops.nms import nms
from ..modeling.preprocess import ImageList, resize_boxes

__all__ = ["im_detect_all", "im_detect_bbox", "box_results_with_nms_and_limit", "im_detect_mask", "segm_results",
           "image_to_tensor"]


def image_to_tensor(im: np.ndarray, device=None) -> torch.Tensor:
    """BGR ``uint8`` ``(H, W, 3)`` → RGB float ``(3, H, W)`` in ``[0, 1]`` (the model's input contract)."""
    if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"expected a BGR image array of shape (H, W, 3), got "
                         f"{getattr(im, 'shape', type(im).__name__)}")
    if im.dtype != np.uint8:
        raise ValueError(f"expected a uint8 BGR image, got dtype {im.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1])).permute(2, 0, 1).float().div_(255.0)
    return t.to(device) if device is not None else t


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class BlobConv:
    """``im_detect_bbox``'s feature maps plus the batch geometry that ``im_detect_mask`` needs."""

    def __init__(self, features, image_list: ImageList, original_size: Tuple[int, int]):
        self.features = features
        self.image_list = image_list
        self.original_size = original_size


@torch.no_grad()
def im_detect_bbox(model, im: np.ndarray, target_scale: int, target_max_size: int,
                   boxes: Optional[np.ndarray] = None):
    """Score and regress RoIs (RPN proposals, or ``boxes`` in original pixels) for one image.

    Returns:
        scores: ``(R, K+1)`` softmax class probabilities.
        pred_boxes: ``(R, 4(K+1))`` class-specific boxes in original pixels, clipped to the image.
        im_scale: resize factor from the original image to the network input.
        blob_conv: the feature maps (pass to ``im_detect_mask``).
    """
    x = image_to_tensor(im, _device(model))
    pre = model.preprocess
    saved = (pre.test_min_size, pre.test_max_size)
    pre.set_test_size(target_scale, target_max_size)
    try:
        image_list, _ = pre([x])
    finally:
        pre.set_test_size(*saved)
    im_scale = image_list.scales[0]
    orig = (int(im.shape[0]), int(im.shape[1]))
    net_size = image_list.image_sizes[0]
    features = model.Conv_Body(image_list.tensors)
    if boxes is None:
        proposals, _ = model.RPN(features, image_list.image_sizes, None)
    else:
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=x.device)
        proposals = [resize_boxes(b, orig, net_size)]
    box_feat = model.Box_Head(features, proposals)
    if isinstance(box_feat, tuple):
        box_feat = box_feat[0]
    cls_score, bbox_pred = model.Box_Outs(box_feat)
    scores = F.softmax(cls_score.float(), dim=-1)
    num_classes = scores.shape[1]
    if model.cfg.TEST.BBOX_REG:
        pred = model.box_coder.decode(bbox_pred.float(), proposals[0])
        if pred.shape[1] == 8:  # class-agnostic regression: background + one box shared by every class
            pred = pred[:, 4:8].repeat(1, num_classes)
    else:
        pred = proposals[0].repeat(1, num_classes)
    pred = clip_boxes_to_image(pred.reshape(-1, 4), net_size)
    pred = resize_boxes(pred, net_size, orig).reshape(-1, 4 * num_classes)
    return scores.cpu().numpy(), pred.cpu().numpy(), im_scale, BlobConv(features, image_list, orig)


def box_results_with_nms_and_limit(scores: np.ndarray, boxes: np.ndarray, cfg=None):
    """Per-class score threshold and NMS, then keep the ``TEST.DETECTIONS_PER_IM`` best over all classes.

    Args:
        scores: ``(R, K+1)``; boxes: ``(R, 4(K+1))`` (or ``(R, 4)`` shared by all classes).
        cfg: settings (``TEST.SCORE_THRESH``, ``TEST.NMS``, ``TEST.DETECTIONS_PER_IM``); the global cfg if None.

    Returns:
        ``(scores (D,), boxes (D, 4), cls_boxes)`` with ``cls_boxes[j]`` ``(n_j, 5)`` float32.
    """
    if cfg is None:
        from ..config import cfg as global_cfg
        cfg = global_cfg
    num_classes = scores.shape[1]
    cls_boxes: List[np.ndarray] = [np.zeros((0, 5), dtype=np.float32) for _ in range(num_classes)]
    for j in range(1, num_classes):
        inds = np.where(scores[:, j] > cfg.TEST.SCORE_THRESH)[0]
        scores_j = scores[inds, j]
        boxes_j = boxes[inds, j * 4:(j + 1) * 4] if boxes.shape[1] > 4 else boxes[inds]
        if inds.size:
            keep = nms(torch.from_numpy(np.ascontiguousarray(boxes_j, dtype=np.float32)),
                       torch.from_numpy(np.ascontiguousarray(scores_j, dtype=np.float32)),
                       float(cfg.TEST.NMS)).numpy()
            boxes_j, scores_j = boxes_j[keep], scores_j[keep]
        cls_boxes[j] = np.hstack((boxes_j, scores_j[:, None])).astype(np.float32, copy=False)
    limit = int(cfg.TEST.DETECTIONS_PER_IM)
    if limit > 0:
        all_scores = np.hstack([cls_boxes[j][:, -1] for j in range(1, num_classes)])
        if len(all_scores) > limit:
            # Exactly `limit` detections: Detectron's `score >= limit-th score` keeps extra ones on ties.
            owner = np.concatenate([np.full(len(cls_boxes[j]), j) for j in range(1, num_classes)])
            keep = np.zeros(len(all_scores), dtype=bool)
            keep[np.argsort(-all_scores, kind="stable")[:limit]] = True
            for j in range(1, num_classes):
                cls_boxes[j] = cls_boxes[j][keep[owner == j]]
    im_results = np.vstack([cls_boxes[j] for j in range(1, num_classes)])
    return im_results[:, -1], im_results[:, :-1], cls_boxes


@torch.no_grad()
def im_detect_mask(model, im_scale: float, boxes: np.ndarray, blob_conv: BlobConv) -> np.ndarray:
    """Mask probabilities ``(R, C, M, M)`` for ``boxes`` (original pixels) — C = K+1, or 1 when class-agnostic."""
    if boxes.shape[0] == 0:
        m = model.cfg.MRCNN.RESOLUTION
        return np.zeros((0, model.cfg.MODEL.NUM_CLASSES, m, m), np.float32)
    net_size = blob_conv.image_list.image_sizes[0]
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)[:, :4], device=blob_conv.image_list.tensors.device)
    rois = [resize_boxes(b, blob_conv.original_size, net_size)]
    features = blob_conv.features
    if getattr(model.Mask_Head, "shares_box_head_res5", False):
        _, res5_map = model.Box_Head(features, rois, return_res5=True)
        mask_feat = model.Mask_Head(res5_map)
    else:
        mask_feat = model.Mask_Head(features, rois)
    return torch.sigmoid(model.Mask_Outs(mask_feat).float()).cpu().numpy()


def segm_results(cls_boxes, masks: np.ndarray, ref_boxes: np.ndarray, im_h: int, im_w: int, cfg=None,
                 padding: int = 1):
    """Paste each mask into the image, binarise at ``MRCNN.THRESH_BINARIZE`` and encode as COCO RLE.

    ``masks`` rows follow ``ref_boxes`` (the concatenation of ``cls_boxes[1:]``). Returns ``cls_segms[j]``: a
    list of RLE dicts (``counts`` as str) for the boxes of class ``j``.
    """
    if cfg is None:
        from ..config import cfg as global_cfg
        cfg = global_cfg
    num_classes = len(cls_boxes)
    cls_segms = [[] for _ in range(num_classes)]
    if ref_boxes.shape[0] == 0:
        return cls_segms
    labels = np.concatenate([np.full(len(cls_boxes[j]), j, dtype=np.int64) for j in range(1, num_classes)])
    idx = labels if masks.shape[1] > 1 else np.zeros_like(labels)
    per_box = torch.from_numpy(np.ascontiguousarray(masks[np.arange(len(labels)), idx]))[:, None]
    pasted = paste_masks_in_image(per_box, torch.from_numpy(np.ascontiguousarray(ref_boxes[:, :4],
                                                                                 dtype=np.float32)),
                                  (int(im_h), int(im_w)), padding=padding)
    binary = (pasted[:, 0] > cfg.MRCNN.THRESH_BINARIZE).numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle, j in zip(rles, labels):
        rle["counts"] = rle["counts"].decode("ascii")
        cls_segms[int(j)].append(rle)
    return cls_segms


def im_detect_all(model, im: np.ndarray, box_proposals: Optional[np.ndarray] = None, timers=None):
    """Boxes and masks for one BGR image: ``(cls_boxes, cls_segms, cls_keyps)`` (keypoints: always None)."""
    cfg = model.cfg
    scores, boxes, im_scale, blob_conv = im_detect_bbox(model, im, cfg.TEST.SCALE, cfg.TEST.MAX_SIZE,
                                                        boxes=box_proposals)
    scores, boxes, cls_boxes = box_results_with_nms_and_limit(scores, boxes, cfg)
    cls_segms = None
    if cfg.MODEL.MASK_ON and hasattr(model, "Mask_Head"):
        masks = im_detect_mask(model, im_scale, boxes, blob_conv)
        cls_segms = segm_results(cls_boxes, masks, boxes, im.shape[0], im.shape[1], cfg,
                                 padding=cfg.TEST.MASK_PASTE_PADDING)
    return cls_boxes, cls_segms, None
