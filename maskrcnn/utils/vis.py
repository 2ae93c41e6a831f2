"""Drawing detections: Detectron's ``vis_one_image`` and a tensor-friendly ``draw_instances``.

Drawing uses OpenCV only (no matplotlib dependency), so the output formats are raster ones (png, jpg). Images
passed to these functions are RGB ``uint8`` ``(H, W, 3)`` arrays, as in Detectron where callers pass
``im[:, :, ::-1]`` of a ``cv2.imread`` image.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["COCO_CLASSES", "COCO_PERSON_SKELETON", "draw_keypoints", "get_coco_dataset", "colormap",
           "convert_from_cls_format", "draw_instances",
           "vis_one_image"]

COCO_CLASSES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]


def get_coco_dataset() -> SimpleNamespace:
    """Detectron's ``dummy_datasets.get_coco_dataset()``: an object whose ``classes`` maps label → name."""
    return SimpleNamespace(classes={i: name for i, name in enumerate(COCO_CLASSES)})


def colormap(n: int = 80, seed: int = 7) -> np.ndarray:
    """``(n, 3)`` uint8 distinct, saturated RGB colours (deterministic)."""
    rng = np.random.RandomState(seed)
    hues = (np.arange(n) * 0.61803398875 + rng.rand()) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def convert_from_cls_format(cls_boxes, cls_segms=None, cls_keyps=None):
    """Detectron's per-class lists → ``(boxes (N, 5), segms list or None, keyps list of (4, K) or None, classes
    list)``."""
    box_list = [b for b in cls_boxes if len(b) > 0]
    boxes = np.concatenate(box_list) if box_list else np.zeros((0, 5), np.float32)
    segms = None
    if cls_segms is not None:
        segms = [s for slist in cls_segms for s in slist]
    keyps = None
    if cls_keyps is not None:
        keyps = [k for klist in cls_keyps for k in klist]
    classes = []
    for j in range(len(cls_boxes)):
        classes += [j] * len(cls_boxes[j])
    return boxes, segms, keyps, classes


#: COCO person skeleton (Detectron's ``kp_connections``), 0-based indices in COCO's 17-keypoint order.
COCO_PERSON_SKELETON = ((1, 2), (1, 0), (2, 0), (2, 4), (1, 3), (6, 8), (8, 10), (5, 7), (7, 9), (12, 14), (14, 16),
                        (11, 13), (13, 15), (6, 5), (12, 11))


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray, kp_thresh: float = 2.0,
                   skeleton: Optional[Sequence[Tuple[int, int]]] = None) -> np.ndarray:
    """Draw keypoints and their skeleton on an RGB ``uint8`` ``(H, W, 3)`` copy of ``image``.

    Args:
        keypoints: ``(N, K, 3)`` ``x, y, score`` (the model's ``keypoints`` with ``keypoints_scores`` as the third
            column, Detectron's logit); points with score below ``kp_thresh`` (and their lines) are not drawn.
        skeleton: index pairs to join; None uses :data:`COCO_PERSON_SKELETON` when ``K == 17``.
    """
    out = np.ascontiguousarray(image.copy())
    kps = np.asarray(keypoints, dtype=np.float32).reshape(-1, *np.asarray(keypoints).shape[-2:]) \
        if np.asarray(keypoints).size else np.zeros((0, 0, 3), np.float32)
    if kps.ndim != 3 or kps.shape[-1] != 3:
        raise ValueError(f"draw_keypoints: keypoints must be (N, K, 3) x, y, score, got {np.asarray(keypoints).shape}")
    k = kps.shape[1]
    if skeleton is None:
        skeleton = COCO_PERSON_SKELETON if k == 17 else ()
    colors = colormap(max(len(skeleton), 1) + k)
    for inst in kps:
        ok = inst[:, 2] >= kp_thresh
        for c, (a, b) in enumerate(skeleton):
            if a < k and b < k and ok[a] and ok[b]:
                cv2.line(out, (int(inst[a, 0]), int(inst[a, 1])), (int(inst[b, 0]), int(inst[b, 1])),
                         tuple(int(v) for v in colors[c]), 2, cv2.LINE_AA)
        for j in range(k):
            if ok[j]:
                cv2.circle(out, (int(inst[j, 0]), int(inst[j, 1])), 3,
                           tuple(int(v) for v in colors[len(skeleton) + j]), -1, cv2.LINE_AA)
    return out


def _class_name(dataset, label: int) -> str:
    if dataset is None:
        return f"class {label}"
    names = dataset.classes if hasattr(dataset, "classes") else dataset
    try:
        return str(names[label])
    except (KeyError, IndexError, TypeError):
        return f"class {label}"


def draw_instances(image: np.ndarray, boxes: np.ndarray, scores: Sequence[float], labels: Sequence[int],
                   masks: Optional[Sequence] = None, class_names=None, thresh: float = 0.5,
                   box_alpha: float = 0.8, mask_alpha: float = 0.45, show_class: bool = True) -> np.ndarray:
    """Draw boxes, masks, class names and scores on a copy of an RGB ``uint8`` image.

    ``boxes`` ``(N, 4)`` x1y1x2y2 image pixels; ``masks`` a list of ``(H, W)`` binary arrays or COCO RLE dicts.
    Larger instances are drawn first so small ones stay visible.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    out = np.ascontiguousarray(image.copy())
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    colors = colormap(max(len(boxes), 1))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas)
    for rank, i in enumerate(order):
        if scores[i] < thresh:
            continue
        color = tuple(int(c) for c in colors[rank % len(colors)])
        if masks is not None:
            m = masks[i]
            if isinstance(m, dict):
                m = mask_util.decode(m)
            m = np.asarray(m).astype(bool)
            if m.shape != out.shape[:2]:
                raise ValueError(f"mask {i} has shape {m.shape}, image is {out.shape[:2]}")
            out[m] = (out[m] * (1 - mask_alpha) + np.array(color) * mask_alpha).astype(np.uint8)
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
        x1, y1, x2, y2 = [int(round(v)) for v in boxes[i]]
        if box_alpha > 0:
            overlay = out.copy()
            cv2.rectangle(overlay, (x1, y1), (x2, y2), color, 2)
            out = cv2.addWeighted(overlay, box_alpha, out, 1 - box_alpha, 0)
        if show_class:
            text = f"{_class_name(class_names, int(labels[i]))} {scores[i]:.2f}"
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            ty = max(y1, th + base)
            cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), color, -1)
            cv2.putText(out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                        cv2.LINE_AA)
    return out


def vis_one_image(im: np.ndarray, im_name: str, output_dir: str, boxes, segms=None, keypoints=None,
                  thresh: float = 0.9, kp_thresh: float = 2, dpi: int = 200, box_alpha: float = 0.0,
                  dataset=None, show_class: bool = False, ext: str = "png", out_when_no_box: bool = False
                  ) -> Optional[str]:
    """Detectron's ``vis_one_image``: write ``output_dir/<im_name stem>.<ext>`` with the detections drawn.

    Args:
        im: RGB ``uint8`` ``(H, W, 3)`` (Detectron callers pass ``im[:, :, ::-1]``).
        boxes: ``cls_boxes`` (per-class list of ``(n, 5)``) or an ``(N, 5)`` array ``[x1, y1, x2, y2, score]``.
        segms: ``cls_segms`` (per-class lists of RLE) matching ``boxes``, or None.
        keypoints: ``cls_keypoints`` (per-class lists of Detectron's ``(4, K)`` arrays ``x, y, logit, prob``) or an
            ``(N, K, 3)`` array ``x, y, score`` matching ``boxes``; drawn with the COCO skeleton (17 keypoints) where
            the score reaches ``kp_thresh`` (Detectron's rule), for boxes above ``thresh``.
        dataset: object with ``classes`` (label → name), e.g. :func:`get_coco_dataset`.
        ext: ``png`` or ``jpg`` (raster formats; ``pdf`` needs matplotlib, which is not a dependency).

    Returns the written path, or None when nothing scored above ``thresh`` and ``out_when_no_box`` is False.
    """
    if ext.lower() not in ("png", "jpg", "jpeg"):
        raise ValueError(f"vis_one_image: ext={ext!r} is not supported; use 'png' or 'jpg'")
    kps = None
    if isinstance(boxes, list):
        boxes, segms, cls_kps, classes = convert_from_cls_format(boxes, segms, keypoints)
        if cls_kps:
            kps = np.stack([np.asarray(k, np.float32)[:3].T for k in cls_kps])  # (4, K) -> (K, 3): x, y, logit
    else:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
        classes = [1] * len(boxes)
        # Detectron's empty per-class lists ([None, [], ...]) mean no keypoints.
        if keypoints is not None and not (isinstance(keypoints, list) and all(k is None or not len(k)
                                                                              for k in keypoints)):
            kps = np.asarray(keypoints, dtype=np.float32)
    if kps is not None and kps.shape[0] != boxes.shape[0]:
        raise ValueError(f"vis_one_image: {kps.shape[0]} keypoint sets for {boxes.shape[0]} boxes")
    if (boxes.shape[0] == 0 or boxes[:, 4].max() < thresh) and not out_when_no_box:
        return None
    drawn = draw_instances(im, boxes[:, :4], boxes[:, 4], classes, segms, class_names=dataset, thresh=thresh,
                           box_alpha=max(box_alpha, 0.3), show_class=show_class)
    if kps is not None:
        drawn = draw_keypoints(drawn, kps[boxes[:, 4] >= thresh], kp_thresh)
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(im_name))[0]
    path = os.path.join(output_dir, f"{stem}.{ext}")
    if not cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"vis_one_image: could not write {path}")
    return path
