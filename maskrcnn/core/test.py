"""Detectron's inference API: a thin adapter over the model's own methods (``model.preprocess`` at an explicit
scale, ``Conv_Body``, ``model.propose``, ``model.roi_heads.predict_boxes`` / ``mask_probs`` and the detection
selection of ``roi_heads/inference.py``), so that it computes what ``Generalized_RCNN.forward`` computes.

Images are BGR ``uint8`` arrays of shape ``(H, W, 3)`` as ``cv2.imread`` returns them. Box arrays are numpy
``float32`` in original-image pixels (x1, y1, x2, y2); ``cls_boxes[j]`` is ``(n_j, 5)`` ``[x1, y1, x2, y2, score]``
for class ``j`` (index 0, the background, stays empty), ``cls_segms[j]`` the matching COCO RLEs and, for a
keypoint model, ``cls_keyps[j]`` the matching ``(4, K)`` arrays (rows x, y, heatmap logit, probability).

Typical use, as in Detectron.pytorch's ``infer_simple.py``::

    cfg_from_file("configs/baselines/e2e_mask_rcnn_R-50-C4_1x.yaml"); assert_and_infer_cfg()
    model = Generalized_RCNN(); load_ckpt(model, "model.pth"); model.eval()
    cls_boxes, cls_segms, cls_keyps = im_detect_all(model, cv2.imread("img.jpg"))

Settings (``TEST.SCALE``, ``TEST.NMS``, ...) are read from ``model.cfg``, which the model copied from the config it
was built with. Test-time augmentation (``TEST.BBOX_AUG``, ``TEST.MASK_AUG``, ``TEST.KPS_AUG``:
:func:`im_detect_bbox_aug`, :func:`im_detect_mask_aug`, :func:`im_detect_keypoints_aug`) and box voting (``TEST.BBOX_VOTE``, in :func:`box_results_with_nms_and_limit`) follow
Detectron's ``im_detect_all``; the augmentation itself is :mod:`maskrcnn.engine.tta`, shared with ``test_net`` and
``Predictor``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from ..modeling.preprocess import ImageList, resize_boxes, resize_keypoints
from ..modeling.roi_heads.keypoint_outputs import heatmaps_to_keypoints
from ..modeling.roi_heads.inference import select_detections
from ..ops.box_voting import BoxVoting
from ..ops.masks import paste_masks_by_method
from ..utils.model import model_device

__all__ = ["im_detect_all", "im_detect_bbox", "im_detect_bbox_aug", "box_results_with_nms_and_limit",
           "im_detect_mask", "im_detect_mask_aug", "segm_results", "im_detect_keypoints", "im_detect_keypoints_aug",
           "keypoint_results", "image_to_tensor", "ImageFeatures"]


def image_to_tensor(im: np.ndarray, device=None) -> torch.Tensor:
    """BGR ``uint8`` ``(H, W, 3)`` → RGB float ``(3, H, W)`` in ``[0, 1]`` (the model's input contract)."""
    if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"expected a BGR image array of shape (H, W, 3), got "
                         f"{getattr(im, 'shape', type(im).__name__)}")
    if im.dtype != np.uint8:
        raise ValueError(f"expected a uint8 BGR image, got dtype {im.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1])).permute(2, 0, 1).float().div_(255.0)
    return t.to(device) if device is not None else t


class ImageFeatures:
    """What ``im_detect_bbox`` computed for one image and ``im_detect_mask`` reuses (Detectron's ``blob_conv``).

    Attributes:
        features: the ``Conv_Body`` output (a Tensor, or a list finest first).
        image_list: the preprocessed one-image batch (network-input size and scale).
        original_size: ``(height, width)`` of the image as given.
    """

    def __init__(self, features, image_list: ImageList, original_size: Tuple[int, int]):
        self.features = features
        self.image_list = image_list
        self.original_size = original_size


@torch.no_grad()
def im_detect_bbox(model, im: np.ndarray, target_scale: int, target_max_size: int,
                   boxes: Optional[np.ndarray] = None):
    """Score and regress RoIs (RPN proposals, or ``boxes`` in original pixels) for one image, resized so that its
    shorter side is ``target_scale`` (longer side at most ``target_max_size``).

    Returns:
        scores: ``(R, K+1)`` softmax class probabilities.
        pred_boxes: ``(R, 4(K+1))`` class-specific boxes in original pixels, clipped to the image.
        im_scale: resize factor from the original image to the network input.
        blob_conv: an :class:`ImageFeatures` (pass to ``im_detect_mask``).
    """
    x = image_to_tensor(im, model_device(model))
    image_list, _ = model.preprocess([x], min_size=target_scale, max_size=target_max_size)
    orig = (int(im.shape[0]), int(im.shape[1]))
    net_size = image_list.image_sizes[0]
    features = model.Conv_Body(image_list.tensors)
    if boxes is None:
        proposals, _ = model.propose(features, image_list)
    else:
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=x.device)
        proposals = [resize_boxes(b, orig, net_size)]
    probs, class_boxes = model.roi_heads.predict_boxes(features, proposals, image_list.image_sizes)
    num_classes = probs[0].shape[1]
    pred = resize_boxes(class_boxes[0].reshape(-1, 4), net_size, orig).reshape(-1, 4 * num_classes)
    return probs[0].cpu().numpy(), pred.cpu().numpy(), image_list.scales[0], ImageFeatures(features, image_list, orig)


def _tta(model):
    from ..engine.tta import TestTimeAugmentation

    # amp='': as for the plain path, the caller owns the autocast region (infer_simple: handle.autocast()).
    return TestTimeAugmentation.from_cfg(model, model.cfg, amp="")


def _proposals_list(boxes: Optional[np.ndarray], device) -> Optional[List[torch.Tensor]]:
    if boxes is None:
        return None
    return [torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=device)]


@torch.no_grad()
def im_detect_bbox_aug(model, im: np.ndarray, box_proposals: Optional[np.ndarray] = None):
    """``im_detect_bbox`` with ``TEST.BBOX_AUG``'s augmentations (Detectron's ``im_detect_bbox_aug``): the
    per-RoI predictions of every run in original pixels, merged with ``SCORE_HEUR`` / ``COORD_HEUR``.

    Returns ``(scores (R, K+1), pred_boxes (R, 4(K+1)), im_scale, blob_conv)`` as :func:`im_detect_bbox`, ``R``
    the merged RoIs; ``im_scale`` and ``blob_conv`` are the plain run's (``TEST.SCALE``).
    """
    x = image_to_tensor(im, model_device(model))
    probs, boxes, ref = _tta(model).detect_boxes([x], _proposals_list(box_proposals, x.device))
    orig, net_size = ref.original_sizes[0], ref.image_list.image_sizes[0]
    num_classes = probs[0].shape[1]
    pred = resize_boxes(boxes[0].reshape(-1, 4), net_size, orig).reshape(-1, 4 * num_classes)
    return (probs[0].cpu().numpy(), pred.cpu().numpy(), ref.image_list.scales[0],
            ImageFeatures(ref.features, ref.image_list, orig))


def box_results_with_nms_and_limit(scores: np.ndarray, boxes: np.ndarray, cfg=None):
    """Per-class score threshold and NMS, then keep the ``TEST.DETECTIONS_PER_IM`` best over all classes: the
    model's own selection (:func:`~maskrcnn.modeling.roi_heads.inference.select_detections`) in original-image
    pixels, without a minimum box size, equal scores ranked by class (Detectron's rules here).

    Args:
        scores: ``(R, K+1)``; boxes: ``(R, 4(K+1))`` (or ``(R, 4)`` shared by all classes).
        cfg: settings (``TEST.SCORE_THRESH``, ``TEST.NMS``, ``TEST.DETECTIONS_PER_IM``, ``TEST.BBOX_VOTE``); the
            global cfg if None.

    Returns:
        ``(scores (D,), boxes (D, 4), cls_boxes)`` with ``cls_boxes[j]`` ``(n_j, 5)`` float32 by decreasing score;
        ``scores`` / ``boxes`` are ``cls_boxes[1:]`` stacked (the row order of ``im_detect_mask``'s masks).
    """
    if cfg is None:
        from ..config import cfg as global_cfg
        cfg = global_cfg
    num_classes = scores.shape[1]
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.shape[1] == 4:
        boxes = np.tile(boxes, (1, num_classes))
    probs = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    limit = int(cfg.TEST.DETECTIONS_PER_IM)
    vote = cfg.TEST.BBOX_VOTE
    voting = BoxVoting(vote.VOTE_TH, vote.SCORING_METHOD, vote.SCORING_METHOD_BETA,
                       legacy_plus_one=bool(cfg.MODEL.LEGACY_PLUS_ONE)) if vote.ENABLED else None
    det_boxes, det_scores, det_labels = select_detections(
        probs, torch.from_numpy(np.ascontiguousarray(boxes)), float(cfg.TEST.SCORE_THRESH), float(cfg.TEST.NMS),
        limit if limit > 0 else probs.numel(), min_size=None, class_major=True, box_voting=voting)
    rows = torch.cat([det_boxes, det_scores[:, None]], dim=1).numpy()
    labels = det_labels.numpy()
    cls_boxes: List[np.ndarray] = [np.zeros((0, 5), dtype=np.float32)]
    cls_boxes += [np.ascontiguousarray(rows[labels == j], dtype=np.float32) for j in range(1, num_classes)]
    im_results = np.vstack(cls_boxes[1:])
    return im_results[:, -1], im_results[:, :-1], cls_boxes


@torch.no_grad()
def im_detect_mask(model, im_scale: float, boxes: np.ndarray, blob_conv: ImageFeatures) -> np.ndarray:
    """Mask probabilities ``(R, C, M, M)`` for ``boxes`` (original pixels) — C = K+1, or 1 when class-agnostic."""
    if boxes.shape[0] == 0:
        m = model.cfg.MRCNN.RESOLUTION
        return np.zeros((0, model.cfg.MODEL.NUM_CLASSES, m, m), np.float32)
    net_size = blob_conv.image_list.image_sizes[0]
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)[:, :4], device=blob_conv.image_list.tensors.device)
    rois = [resize_boxes(b, blob_conv.original_size, net_size)]
    return model.roi_heads.mask_probs(blob_conv.features, rois)[0].cpu().numpy()


@torch.no_grad()
def im_detect_mask_aug(model, im: np.ndarray, boxes: np.ndarray, blob_conv: Optional[ImageFeatures] = None
                       ) -> np.ndarray:
    """``im_detect_mask`` with ``TEST.MASK_AUG``'s augmentations (Detectron's ``im_detect_mask_aug``): mask
    probabilities ``(R, C, M, M)`` of ``boxes`` (original pixels) merged over the runs with ``TEST.MASK_AUG.HEUR``.
    ``blob_conv`` (from :func:`im_detect_bbox` / :func:`im_detect_bbox_aug`) saves the plain run's backbone."""
    if boxes.shape[0] == 0:
        m = model.cfg.MRCNN.RESOLUTION
        return np.zeros((0, model.cfg.MODEL.NUM_CLASSES, m, m), np.float32)
    tta, x, ref, rois = _per_box_augmentation_inputs(model, im, boxes, blob_conv)
    return tta.detect_masks([x], ref, rois)[0].cpu().numpy()


def _per_box_augmentation_inputs(model, im: np.ndarray, boxes: np.ndarray, blob_conv: Optional[ImageFeatures]):
    """What the per-box augmentations (masks, keypoints) of one image need: the TTA module, the image tensor, the
    plain run (``blob_conv``'s, or computed now) and ``boxes`` in its network-input pixels."""
    from ..engine.tta import ReferenceRun

    tta = _tta(model)
    x = image_to_tensor(im, model_device(model))
    orig = (int(im.shape[0]), int(im.shape[1]))
    if blob_conv is None:
        image_list, features = tta.run_backbone([x], tta.reference)
        blob_conv = ImageFeatures(features, image_list, orig)
    ref = ReferenceRun(blob_conv.image_list, blob_conv.features, [orig])
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)[:, :4], device=x.device)
    rois = [resize_boxes(b, orig, ref.image_list.image_sizes[0])]
    return tta, x, ref, rois


def _empty_heatmaps(model) -> np.ndarray:
    k = model.cfg.KRCNN
    return np.zeros((0, int(k.NUM_KEYPOINTS), int(k.HEATMAP_SIZE), int(k.HEATMAP_SIZE)), np.float32)


@torch.no_grad()
def im_detect_keypoints(model, im_scale: float, boxes: np.ndarray, blob_conv: ImageFeatures) -> np.ndarray:
    """Heatmap logits ``(R, K, H, H)`` float32 for ``boxes`` (original pixels), Detectron's ``im_detect_keypoints``."""
    if boxes.shape[0] == 0:
        return _empty_heatmaps(model)
    net_size = blob_conv.image_list.image_sizes[0]
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)[:, :4], device=blob_conv.image_list.tensors.device)
    rois = [resize_boxes(b, blob_conv.original_size, net_size)]
    heads = model.roi_heads
    return heads.Keypoint_Outs(heads.Keypoint_Head(blob_conv.features, rois)).float().cpu().numpy()


@torch.no_grad()
def im_detect_keypoints_aug(model, im: np.ndarray, boxes: np.ndarray, blob_conv: Optional[ImageFeatures] = None
                            ) -> np.ndarray:
    """``im_detect_keypoints`` with ``TEST.KPS_AUG``'s augmentations (Detectron's ``im_detect_keypoints_aug``):
    heatmap logits ``(R, K, H, H)`` of ``boxes`` (original pixels) merged over the runs with ``TEST.KPS_AUG.HEUR``."""
    if boxes.shape[0] == 0:
        return _empty_heatmaps(model)
    tta, x, ref, rois = _per_box_augmentation_inputs(model, im, boxes, blob_conv)
    return tta.keypoint_heatmaps([x], ref, rois)[0].cpu().numpy()


def keypoint_results(cls_boxes, pred_heatmaps: np.ndarray, ref_boxes: np.ndarray,
                     image_size: Optional[Tuple[int, int]] = None, network_size: Optional[Tuple[int, int]] = None):
    """Detectron's ``keypoint_results``: ``cls_keyps[j]``, one ``(4, K)`` float32 array per box of class ``j``
    (rows ``x, y`` in original pixels, the heatmap logit there, and its probability), in ``cls_boxes`` order.

    ``pred_heatmaps`` rows follow ``ref_boxes`` (the concatenation of ``cls_boxes[1:]``, original pixels). With
    ``image_size`` and ``network_size`` (``(h, w)`` of the image and of the network input) the keypoints are placed
    on the boxes in network-input pixels and scaled back, as the model's own forward does (so both give the same
    keypoints); without them, on the original-pixel boxes as Detectron does. The probability is the spatial
    softmax of the ``H x H`` heatmap at its largest cell (Detectron takes it on the map resized to the box).
    """
    num_classes = len(cls_boxes)
    cls_keyps = [[] for _ in range(num_classes)]
    if ref_boxes.shape[0] == 0:
        return cls_keyps
    maps = torch.from_numpy(np.ascontiguousarray(pred_heatmaps, dtype=np.float32))
    boxes = torch.from_numpy(np.ascontiguousarray(ref_boxes[:, :4], dtype=np.float32))
    if image_size is not None and network_size is not None:
        xy, logits = heatmaps_to_keypoints(maps, resize_boxes(boxes, image_size, network_size))
        xy = resize_keypoints(xy, network_size, image_size)
    else:
        xy, logits = heatmaps_to_keypoints(maps, boxes)
    flat = maps.flatten(2)
    probs = torch.exp(flat.amax(dim=2) - torch.logsumexp(flat, dim=2))
    rows = torch.stack([xy[..., 0], xy[..., 1], logits, probs], dim=1).numpy()  # (R, 4, K)
    labels = np.concatenate([np.full(len(cls_boxes[j]), j, dtype=np.int64) for j in range(1, num_classes)])
    for r, j in zip(rows, labels):
        cls_keyps[int(j)].append(np.ascontiguousarray(r, dtype=np.float32))
    return cls_keyps


def segm_results(cls_boxes, masks: np.ndarray, ref_boxes: np.ndarray, im_h: int, im_w: int, cfg=None,
                 padding: int = 1):
    """Paste each mask into the image, binarise at ``MRCNN.THRESH_BINARIZE`` and encode as COCO RLE.

    ``masks`` rows follow ``ref_boxes`` (the concatenation of ``cls_boxes[1:]``). Pasted as
    ``cfg.TEST.MASK_PASTE_METHOD`` says (``padding`` is read by ``"torchvision"`` only), as the model's own
    ``forward`` pastes. Returns ``cls_segms[j]``: a list of RLE dicts (``counts`` as str) for the boxes of class
    ``j``.
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
    boxes = torch.from_numpy(np.ascontiguousarray(ref_boxes[:, :4], dtype=np.float32))
    pasted = paste_masks_by_method(per_box, boxes, (int(im_h), int(im_w)), cfg.TEST.MASK_PASTE_METHOD, padding)
    binary = (pasted[:, 0] > cfg.MRCNN.THRESH_BINARIZE).numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle, j in zip(rles, labels):
        rle["counts"] = rle["counts"].decode("ascii")
        cls_segms[int(j)].append(rle)
    return cls_segms


def im_detect_all(model, im: np.ndarray, box_proposals: Optional[np.ndarray] = None, timers=None):
    """Boxes, masks and keypoints for one BGR image: ``(cls_boxes, cls_segms, cls_keyps)`` (None for a missing
    head).

    ``box_proposals``: ``(P, 4)`` RoIs in original pixels instead of the RPN's. With ``TEST.BBOX_AUG.ENABLED`` /
    ``TEST.MASK_AUG.ENABLED`` / ``TEST.KPS_AUG.ENABLED`` the boxes / masks / keypoints come from
    :func:`im_detect_bbox_aug` / :func:`im_detect_mask_aug` / :func:`im_detect_keypoints_aug`.
    """
    cfg = model.cfg
    if cfg.TEST.BBOX_AUG.ENABLED:
        scores, boxes, im_scale, blob_conv = im_detect_bbox_aug(model, im, box_proposals)
    else:
        scores, boxes, im_scale, blob_conv = im_detect_bbox(model, im, cfg.TEST.SCALE, cfg.TEST.MAX_SIZE,
                                                            boxes=box_proposals)
    scores, boxes, cls_boxes = box_results_with_nms_and_limit(scores, boxes, cfg)
    cls_segms = None
    if model.mask_on:
        if cfg.TEST.MASK_AUG.ENABLED:
            masks = im_detect_mask_aug(model, im, boxes, blob_conv)
        else:
            masks = im_detect_mask(model, im_scale, boxes, blob_conv)
        cls_segms = segm_results(cls_boxes, masks, boxes, im.shape[0], im.shape[1], cfg,
                                 padding=cfg.TEST.MASK_PASTE_PADDING)
    cls_keyps = None
    if getattr(model.roi_heads, "keypoints_on", False):
        if cfg.TEST.KPS_AUG.ENABLED:
            heatmaps = im_detect_keypoints_aug(model, im, boxes, blob_conv)
        else:
            heatmaps = im_detect_keypoints(model, im_scale, boxes, blob_conv)
        cls_keyps = keypoint_results(cls_boxes, heatmaps, boxes, image_size=(int(im.shape[0]), int(im.shape[1])),
                                     network_size=tuple(blob_conv.image_list.image_sizes[0]))
    return cls_boxes, cls_segms, cls_keyps
