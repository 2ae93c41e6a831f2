"""COCO-format annotation files and detections of COCO's size without COCO: images are only declared (no pixels).

``write_coco_json(path, 118_287, 860_001)`` writes a train2017-sized json (about COCO's file size: polygons of 6-48
vertices with two-decimal coordinates, 1-3 parts, ~1% crowd regions as uncompressed RLE like COCO's, ~2% instances
as compressed RLE strings, 80 categories with COCO's non-contiguous ids, random image ids listed in random order,
annotations in random image order). ``make_coco_json(...)`` returns the same content as a dict, for small files in
tests. ``make_detections(gt, 100)`` draws COCO results for every image of a ground truth: jittered copies of its
objects (true positives of varied IoU) and random false positives, each with a box and an RLE mask.

Everything is seeded: same arguments, same bytes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pycocotools.mask as mask_util

__all__ = ["COCO_TRAIN2017", "COCO_VAL2017", "make_coco_json", "write_coco_json", "make_detections"]

#: (images, annotations) of COCO 2017's instance annotations.
COCO_TRAIN2017 = (118_287, 860_001)
COCO_VAL2017 = (5_000, 36_781)

_SIZES = np.array([(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (640, 640), (424, 640)])
# COCO's 80 category ids (1..90 with gaps).
_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
_CHUNK = 20_000


def _images(num_images: int, rng: np.random.Generator) -> List[Dict[str, Any]]:
    ids = np.sort(rng.choice(np.arange(1, 6 * num_images + 10), size=num_images, replace=False))
    hw = _SIZES[rng.integers(0, len(_SIZES), size=num_images)]
    order = rng.permutation(num_images)
    return [{"id": int(ids[k]), "file_name": f"{int(ids[k]):012d}.jpg", "height": int(hw[k, 0]),
             "width": int(hw[k, 1])} for k in order.tolist()]


def _polygons(rng: np.random.Generator, h: np.ndarray, w: np.ndarray, scale: np.ndarray = None
              ) -> Tuple[List[List[float]], np.ndarray, np.ndarray]:
    """One star-shaped polygon per entry of ``h``/``w`` (image sizes): flat ``[x0, y0, x1, y1, ...]`` lists with
    two-decimal coordinates inside the image, their ``(n, 4)`` bounding boxes ``[x, y, w, h]`` and areas."""
    n = len(h)
    size = np.minimum(h, w).astype(np.float64)
    radius = np.exp(rng.uniform(np.log(3.0), np.log(size / 2.2))) if scale is None else scale
    cx = rng.uniform(0.1, 0.9, n) * w
    cy = rng.uniform(0.1, 0.9, n) * h
    nv = rng.integers(6, 49, size=n)
    start = np.concatenate([[0], np.cumsum(nv)])
    owner = np.repeat(np.arange(n), nv)
    # sorted angles per polygon: a random phase plus an increasing sequence
    steps = rng.uniform(0.5, 1.5, size=len(owner))
    cum = np.cumsum(steps)
    cum -= np.repeat(cum[start[:-1]] - steps[start[:-1]], nv)
    total = np.repeat(cum[start[1:] - 1] + rng.uniform(0.5, 1.5, n), nv)
    ang = 2 * np.pi * cum / total + np.repeat(rng.uniform(0, 2 * np.pi, n), nv)
    rad = np.repeat(radius, nv) * rng.uniform(0.6, 1.0, size=len(owner))
    x = np.clip(np.repeat(cx, nv) + rad * np.cos(ang), 0, np.repeat(w, nv)).round(2)
    y = np.clip(np.repeat(cy, nv) + rad * np.sin(ang), 0, np.repeat(h, nv)).round(2)
    xy = np.stack([x, y], axis=1).reshape(-1)
    x0, x1 = np.minimum.reduceat(x, start[:-1]), np.maximum.reduceat(x, start[:-1])
    y0, y1 = np.minimum.reduceat(y, start[:-1]), np.maximum.reduceat(y, start[:-1])
    boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).round(2)
    # shoelace area: sum over edges (x_i y_next - x_next y_i), next wrapping to the polygon's first vertex
    nxt = np.arange(len(owner)) + 1
    nxt[start[1:] - 1] = start[:-1]
    areas = 0.5 * np.abs(np.add.reduceat(x * y[nxt] - x[nxt] * y, start[:-1]))
    flat = xy.tolist()
    return [flat[2 * start[k]:2 * start[k + 1]] for k in range(n)], boxes, areas


def _annotation_chunks(images: List[Dict[str, Any]], num_annotations: int, rng: np.random.Generator,
                       crowd_fraction: float, rle_fraction: float) -> Iterator[List[Dict[str, Any]]]:
    hs = np.array([im["height"] for im in images])
    ws = np.array([im["width"] for im in images])
    ids = np.array([im["id"] for im in images])
    for first in range(0, num_annotations, _CHUNK):
        n = min(_CHUNK, num_annotations - first)
        img = rng.integers(0, len(images), size=n)
        h, w = hs[img], ws[img]
        kind = rng.uniform(size=n)
        parts = np.where(rng.uniform(size=n) < 0.1, rng.integers(2, 4, size=n), 1)
        cats = rng.integers(0, len(_CAT_IDS), size=n)
        polys, boxes, areas = _polygons(rng, np.repeat(h, parts), np.repeat(w, parts))
        boxes, areas = boxes.tolist(), areas.tolist()
        rects = np.stack([rng.uniform(0, 0.5, n) * w, rng.uniform(0, 0.5, n) * h,
                          rng.uniform(0.2, 0.5, n) * w, rng.uniform(0.2, 0.5, n) * h], axis=1).astype(np.int64)
        out, p = [], 0
        for k in range(n):
            hh, ww = int(h[k]), int(w[k])
            ann: Dict[str, Any] = {"id": first + k + 1, "image_id": int(ids[img[k]]),
                                   "category_id": _CAT_IDS[int(cats[k])], "iscrowd": 0}
            m = int(parts[k])
            own = polys[p:p + m]
            b = boxes[p:p + m]
            area = sum(areas[p:p + m])
            p += m
            if kind[k] < crowd_fraction:
                x, y, bw, bh = (int(v) for v in rects[k])
                # column-major runs of the rectangle [x, x + bw) x [y, y + bh): COCO's uncompressed crowd RLE
                counts = [x * hh + y, bh] + [hh - bh, bh] * (bw - 1) + [hh * ww - (x + bw - 1) * hh - y - bh]
                ann.update(iscrowd=1, segmentation={"counts": counts, "size": [hh, ww]}, area=bw * bh,
                           bbox=[x, y, bw, bh])
            else:
                if m == 1:
                    ann["bbox"] = b[0]
                else:
                    x0, y0 = min(q[0] for q in b), min(q[1] for q in b)
                    x1, y1 = max(q[0] + q[2] for q in b), max(q[1] + q[3] for q in b)
                    ann["bbox"] = [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]
                if kind[k] < crowd_fraction + rle_fraction:
                    rle = mask_util.merge(mask_util.frPyObjects(own, hh, ww))
                    ann.update(segmentation={"size": [hh, ww], "counts": rle["counts"].decode("ascii")},
                               area=float(mask_util.area(rle)))
                else:
                    ann.update(segmentation=own, area=round(area, 3))
            out.append(ann)
        yield out


def _header(num_images: int, seed: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]], np.random.Generator]:
    rng = np.random.default_rng(seed)
    info = {"description": f"synthetic COCO-format annotations (benchmarks/coco_json.py, seed {seed})"}
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in _CAT_IDS]
    return {"info": info, "licenses": [], "categories": categories}, _images(num_images, rng), rng


def make_coco_json(num_images: int, num_annotations: int, seed: int = 0, crowd_fraction: float = 0.01,
                   rle_fraction: float = 0.02) -> Dict[str, Any]:
    """A COCO-format dict with ``num_images`` images and ``num_annotations`` annotations (see the module doc)."""
    head, images, rng = _header(num_images, seed)
    anns = [a for chunk in _annotation_chunks(images, num_annotations, rng, crowd_fraction, rle_fraction)
            for a in chunk]
    return dict(head, images=images, annotations=anns)


def write_coco_json(path: str, num_images: int, num_annotations: int, seed: int = 0, crowd_fraction: float = 0.01,
                    rle_fraction: float = 0.02) -> int:
    """Write the json of :func:`make_coco_json` (same content) to ``path`` chunk by chunk, so that memory stays
    small; returns the file size in bytes."""
    head, images, rng = _header(num_images, seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(head)[:-1])
        f.write(', "images": ' + json.dumps(images, separators=(",", ":")) + ', "annotations": [')
        sep = ""
        for chunk in _annotation_chunks(images, num_annotations, rng, crowd_fraction, rle_fraction):
            f.write(sep + json.dumps(chunk, separators=(",", ":"))[1:-1])
            sep = ","
        f.write("]}")
    os.replace(tmp, path)
    return os.path.getsize(path)


def make_detections(gt: Dict[str, Any], per_image: int = 100, seed: int = 0, tp_fraction: float = 0.8
                    ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """``(bbox results, segm results)``: ``per_image`` detections on every image of ``gt`` (a COCO dict), the same
    objects in both lists. Each non-crowd object is found with probability ``tp_fraction`` by a copy of its outline
    moved and scaled at random (some matches at high IoU, some at low); the rest are random polygons of random
    categories. Scores: U(0.3, 1) for found objects, 0.8 U(0, 1)^2 for false positives; masks are compressed RLEs (``counts`` str), boxes ``[x, y, w, h]``."""
    rng = np.random.default_rng(seed)
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0) and rng.uniform() < tp_fraction:
            by_image.setdefault(a["image_id"], []).append(a)
    bbox_res, segm_res = [], []
    for im in gt["images"]:
        hh, ww = int(im["height"]), int(im["width"])
        objs = by_image.get(im["id"], [])[:per_image]
        outlines, cats = [], []
        for a in objs:
            x, y, bw, bh = a["bbox"]
            base = (a["segmentation"][0] if isinstance(a["segmentation"], list)
                    else [x, y, x + bw, y, x + bw, y + bh, x, y + bh])
            p = np.asarray(base, dtype=np.float64).reshape(-1, 2)
            c = p.mean(axis=0)
            s = rng.uniform(0.85, 1.15)
            shift = rng.normal(0, 0.06, 2) * [max(bw, 1.0), max(bh, 1.0)]
            q = (p - c) * s + c + shift
            q[:, 0] = q[:, 0].clip(0, ww)
            q[:, 1] = q[:, 1].clip(0, hh)
            outlines.append(q.round(2).reshape(-1).tolist())
            cats.append(a["category_id"])
        n_fp = per_image - len(objs)
        if n_fp:
            fp, _, _ = _polygons(rng, np.full(n_fp, hh), np.full(n_fp, ww))
            outlines += fp
            cats += [_CAT_IDS[int(k)] for k in rng.integers(0, len(_CAT_IDS), size=n_fp)]
        rles = mask_util.frPyObjects(outlines, hh, ww)
        boxes = mask_util.toBbox(rles)
        # found objects score higher than false positives on average, as with a trained detector
        scores = np.concatenate([rng.uniform(0.3, 1.0, size=len(objs)), 0.8 * rng.uniform(size=n_fp) ** 2])
        for k, rle in enumerate(rles):
            if boxes[k, 2] <= 0 or boxes[k, 3] <= 0:
                continue  # an outline squashed onto the border: no detection
            common = {"image_id": im["id"], "category_id": cats[k], "score": round(float(scores[k]), 4)}
            bbox_res.append(dict(common, bbox=[round(float(v), 2) for v in boxes[k]]))
            segm_res.append(dict(common, segmentation={"size": [hh, ww], "counts": rle["counts"].decode("ascii")}))
    return bbox_res, segm_res
