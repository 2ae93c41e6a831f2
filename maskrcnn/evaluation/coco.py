"""COCO-style evaluation (pycocotools ``COCOeval``) of box and mask results on any dataset.

Datasets read from a COCO json keep their own ground truth (``dataset.coco``); any other dataset (Penn-Fudan, the
synthetic set, a user's) gets one built from its items: boxes as ``[x, y, w, h]``, masks as RLE, ``area`` and
``iscrowd`` from the target (area defaults to the mask's pixel count).

Two implementations of ``COCOeval`` give the same numbers: pycocotools' (Python loops) and ``faster-coco-eval``'s
(C++; the optional extra ``fast-eval``, pinned in ``requirements-dev.txt``). ``evaluate_coco(evaluator="auto")``
takes faster-coco-eval when it is installed: on 5,000 images x 100 detections it evaluates boxes and masks several
times faster with AP equal to 4 decimals (``benchmarks/data.py``, ``docs/benchmarks.md``).

Metrics are in percent: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}}``; a value COCO cannot
compute (e.g. ``APl`` with no large objects) is NaN in Python and ``null`` in ``metrics.json``. With
``detailed=True`` (what ``maskrcnn-test``'s ``metrics.json`` and the evaluations during training hold) each type
also has the six recalls ``AR1, AR10, AR100, ARs, ARm, ARl`` and one ``AP-<class name>`` per category
(detectron2's names).

Keypoints (iou type ``"keypoints"``, pycocotools' OKS): results carry ``keypoints`` ``[x1, y1, v1, ...]`` and the
box score; the ground truth's ``keypoints`` / ``num_keypoints`` come from the dataset (instances without visible
keypoints are ignored by COCOeval). The OKS sigmas are COCO's 17 person sigmas unless given (``kpt_oks_sigmas``,
``TEST.KEYPOINT_OKS_SIGMAS``), which any other keypoint set must do. Its metrics are
``AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl`` (:data:`KEYPOINT_METRIC_NAMES`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["METRIC_NAMES", "RECALL_NAMES", "KEYPOINT_METRIC_NAMES", "COCO_PERSON_OKS_SIGMAS", "IOU_TYPES",
           "EVALUATORS", "resolve_evaluator", "oks_sigmas", "dataset_image_id",
           "contiguous_to_category_id", "class_names", "coco_gt_from_dataset", "evaluate_coco", "write_metrics",
           "mask_to_rle"]

logger = logging.getLogger("maskrcnn.evaluation")

#: Names of the first six COCOeval statistics, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Names of the last six COCOeval statistics (average recall at 1, 10, 100 detections; by area at 100), in order.
RECALL_NAMES = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

#: COCOeval's ten keypoint statistics, in order (no small-object entries: COCO has no small people with keypoints).
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
#: pycocotools' OKS sigmas of COCO's 17 person keypoints (its default).
COCO_PERSON_OKS_SIGMAS = (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
#: Result types :func:`evaluate_coco` knows.
IOU_TYPES = ("bbox", "segm", "keypoints")

#: Values of ``evaluate_coco(evaluator=...)``.
EVALUATORS = ("auto", "pycocotools", "faster_coco_eval")


def resolve_evaluator(evaluator: str = "auto") -> str:
    """The COCOeval implementation ``evaluator`` names: ``"auto"`` is ``"faster_coco_eval"`` when that package
    imports, else ``"pycocotools"``. Asking for ``"faster_coco_eval"`` without it installed is an ``ImportError``
    that says how to install it."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}, got {evaluator!r}")
    if evaluator == "pycocotools":
        return evaluator
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as e:
        if evaluator == "faster_coco_eval":
            raise ImportError("evaluator='faster_coco_eval' needs the faster-coco-eval package: "
                              "pip install 'maskrcnn[fast-eval]' (or faster-coco-eval==1.8.0); "
                              "evaluator='pycocotools' gives the same AP, slower") from e
        return "pycocotools"
    return "faster_coco_eval"


def oks_sigmas(num_keypoints: int, sigmas: Optional[Sequence[float]] = None) -> np.ndarray:
    """The OKS sigmas for ``num_keypoints`` keypoints: ``sigmas`` when given (one per keypoint), else COCO's person
    sigmas for 17; raises ValueError naming ``TEST.KEYPOINT_OKS_SIGMAS`` otherwise."""
    if sigmas:
        if len(sigmas) != num_keypoints or not all(float(v) > 0 for v in sigmas):
            raise ValueError(f"TEST.KEYPOINT_OKS_SIGMAS has {len(sigmas)} values {list(sigmas)} for {num_keypoints} "
                             f"keypoints: give one positive sigma per keypoint")
        return np.asarray(sigmas, dtype=np.float64)
    if num_keypoints != len(COCO_PERSON_OKS_SIGMAS):
        raise ValueError(f"keypoint evaluation of {num_keypoints} keypoints needs their OKS sigmas (COCO's are for "
                         f"its 17 person keypoints): set TEST.KEYPOINT_OKS_SIGMAS to {num_keypoints} values "
                         f"(e.g. [{', '.join(['0.05'] * num_keypoints)}])")
    return np.asarray(COCO_PERSON_OKS_SIGMAS, dtype=np.float64) / 10.0


def _run_cocoeval(evaluator: str, coco_gt: COCO, dets: List[Dict[str, Any]], iou_type: str, img_ids: List[int],
                  gt_cache: Dict[str, Any], kpt_sigmas: Optional[np.ndarray] = None):
    """Evaluate + accumulate with ``evaluator``; returns ``(evaluated COCOeval, the 12-line table)``."""
    # loadRes adds keys (area, id, bbox, iscrowd) to each result: give it copies, the caller's lists stay intact.
    dets = [dict(d) for d in dets]
    table: List[str] = []
    if evaluator == "pycocotools" or iou_type == "keypoints":
        # Keypoints always with pycocotools: its OKS is the reference (sigmas set per dataset below).
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
            if kpt_sigmas is not None:
                ev.params.kpt_oks_sigmas = kpt_sigmas
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.summarize()
        return ev, buf.getvalue().rstrip()
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    key = id(coco_gt.dataset)
    if key not in gt_cache:  # the same ground-truth dicts, indexed once per evaluate_coco call
        gt = FastCOCO(print_function=lambda *a: None)
        gt.dataset = coco_gt.dataset
        gt.createIndex()
        gt_cache[key] = gt
    gt = gt_cache[key]
    ev = COCOeval_faster(gt, gt.loadRes(dets), iou_type, print_function=lambda *a: None)
    ev.params.imgIds = img_ids
    ev.evaluate()
    ev.accumulate()
    ev.print_function = table.append
    ev.summarize()
    return ev, "\n".join(str(line) for line in table).rstrip()


def dataset_image_id(dataset, index: int) -> int:
    """The image id results for item ``index`` carry: ``get_image_info(index)["id"]`` (the COCO image id for COCO
    datasets), else the item's ``target["image_id"]``."""
    if hasattr(dataset, "get_image_info"):
        return int(dataset.get_image_info(index)["id"])
    _, target = dataset[index]
    return int(target["image_id"])


def contiguous_to_category_id(dataset) -> Dict[int, int]:
    """Label (1..K) -> category id of the results: the dataset's ``contiguous_to_category_id`` (COCO json), or the
    identity over its classes."""
    mapping = getattr(dataset, "contiguous_to_category_id", None)
    if mapping:
        return {int(k): int(v) for k, v in mapping.items()}
    names = getattr(dataset, "classes", None)
    if not names:
        raise ValueError(f"dataset {dataset!r} has neither contiguous_to_category_id nor classes; cannot name its "
                         f"categories for COCO evaluation")
    return {k: k for k in range(1, len(names))}


def class_names(dataset) -> Dict[int, str]:
    """Category id -> name, for the per-category tables."""
    names = list(getattr(dataset, "classes", []) or [])
    out = {}
    for label, cat in contiguous_to_category_id(dataset).items():
        out[cat] = names[label] if label < len(names) else f"class {label}"
    return out


def mask_to_rle(masks: np.ndarray) -> List[Dict[str, Any]]:
    """COCO RLEs (``counts`` as ``str``, json-ready) of ``(N, H, W)`` binary masks."""
    masks = np.asarray(masks, dtype=np.uint8)
    if masks.ndim != 3:
        raise ValueError(f"mask_to_rle: expected (N, H, W) masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return list(rles)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _indexed_coco(data: Dict[str, Any]) -> COCO:
    """A ``pycocotools`` COCO of the dict ``data`` (``images``, ``annotations``, ``categories``), indexed quietly."""
    out = COCO()
    out.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines while indexing
        out.createIndex()
    return out


def _complete_coco(coco: COCO) -> COCO:
    """``coco`` itself when every annotation has ``iscrowd`` and ``area`` (COCOeval needs both), else a completed
    copy (``iscrowd`` 0, ``area`` of the segmentation or box)."""
    anns = coco.dataset.get("annotations", [])
    if all("iscrowd" in a and "area" in a for a in anns):
        return coco
    data = copy.deepcopy(coco.dataset)
    imgs = {im["id"]: im for im in data.get("images", [])}
    for a in data["annotations"]:
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            if a.get("segmentation"):
                im = imgs[a["image_id"]]
                seg = a["segmentation"]
                rle = (mask_util.merge(mask_util.frPyObjects(seg, im["height"], im["width"])) if isinstance(seg, list)
                       else seg)
                if isinstance(rle.get("counts"), list):
                    rle = mask_util.frPyObjects(rle, im["height"], im["width"])
                a["area"] = float(mask_util.area(rle))
            else:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
    return _indexed_coco(data)


def _usable_segmentation(seg: Any) -> bool:
    """Whether pycocotools can turn ``seg`` into a mask: an RLE dict, or a list of polygons of >= 3 points."""
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    return (isinstance(seg, list) and len(seg) > 0 and
            all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg))


def _segm_ground_truth(coco_gt: COCO) -> Tuple[COCO, int]:
    """The ground truth of the mask evaluation: ``coco_gt`` itself when every annotation has a usable
    segmentation, else a copy where each annotation without one (a box-only object of a json that masks the
    others) is an ignored region (``iscrowd`` 1, its box as the polygon): a detection on it is neither a hit nor a
    false positive, as the mask it would be scored against is unknown. Returns ``(ground truth, number of such
    annotations)``; pycocotools and faster-coco-eval fail on them otherwise."""
    anns = coco_gt.dataset.get("annotations", [])
    if all(_usable_segmentation(a.get("segmentation")) for a in anns):
        return coco_gt, 0
    data = dict(coco_gt.dataset)
    data["annotations"], missing = [], 0
    for a in anns:
        if not _usable_segmentation(a.get("segmentation")):
            x, y, w, h = (float(v) for v in a["bbox"])
            a = dict(a, iscrowd=1, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
            missing += 1
        data["annotations"].append(a)
    return _indexed_coco(data), missing


def coco_gt_from_dataset(dataset, indices: Optional[Sequence[int]] = None) -> COCO:
    """A ``pycocotools`` ground truth for ``dataset`` (the dataset's own ``coco`` object when it has one).

    Args:
        dataset: items ``(image, target)`` with target ``boxes`` (N,4) xyxy, ``labels``, optional ``masks``
            (N,H,W), ``area``, ``iscrowd``; or a COCO dataset with a ``coco`` attribute.
        indices: items to include (default all); ignored for COCO datasets (evaluation restricts image ids).
    """
    own = getattr(dataset, "coco", None)
    if isinstance(own, COCO):
        return _complete_coco(own)
    cat_of = contiguous_to_category_id(dataset)
    names = class_names(dataset)
    images, annotations = [], []
    indices = range(len(dataset)) if indices is None else indices
    for index in indices:
        image, target = dataset[int(index)]
        h, w = int(image.shape[-2]), int(image.shape[-1])
        image_id = dataset_image_id(dataset, int(index))
        info = dataset.get_image_info(int(index)) if hasattr(dataset, "get_image_info") else {}
        images.append({"id": image_id, "height": h, "width": w, "file_name": str(info.get("file_name", index))})
        boxes = _as_numpy(target["boxes"]).reshape(-1, 4).astype(np.float64)
        labels = _as_numpy(target["labels"]).reshape(-1)
        n = len(labels)
        crowd = _as_numpy(target["iscrowd"]).reshape(-1) if "iscrowd" in target else np.zeros(n, np.int64)
        rles = mask_to_rle(_as_numpy(target["masks"])) if "masks" in target else [None] * n
        if "area" in target:
            areas = _as_numpy(target["area"]).reshape(-1).astype(np.float64)
        elif "masks" in target:
            areas = np.array([float(mask_util.area(r)) for r in rles])
        else:
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        kps = _as_numpy(target["keypoints"]).reshape(n, -1, 3).astype(np.float64) if "keypoints" in target else None
        for k in range(n):
            x1, y1, x2, y2 = boxes[k].tolist()
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_of[int(labels[k])],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(areas[k]), "iscrowd": int(crowd[k])}
            if rles[k] is not None:
                ann["segmentation"] = rles[k]
            if kps is not None:
                ann["keypoints"] = [round(float(v), 3) for v in kps[k].reshape(-1)]
                ann["num_keypoints"] = int((kps[k][:, 2] > 0).sum())
            annotations.append(ann)
    kp_names = list(getattr(dataset, "keypoint_names", []) or [])
    categories = [dict({"id": cat, "name": names[cat]}, **({"keypoints": kp_names} if kp_names else {}))
                  for cat in sorted(names)]
    return _indexed_coco({"images": images, "annotations": annotations, "categories": categories})


def _per_category_ap(coco_eval: COCOeval) -> Dict[int, float]:
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets.
    precision = coco_eval.eval["precision"]
    out = {}
    for k, cat in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cat)] = float(p.mean() * 100) if p.size else float("nan")
    return out


def _format_per_category(ap: Mapping[int, float], names: Mapping[int, str], columns: int = 3) -> str:
    cells = [f"{names.get(c, str(c)):<16} {v:6.2f}" for c, v in ap.items()]
    rows = [" | ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(rows)


def evaluate_coco(coco_gt: COCO, results: Mapping[str, List[Dict[str, Any]]], img_ids: Optional[Sequence[int]] = None,
                  names: Optional[Mapping[int, str]] = None, log: Optional[Callable[[str], Any]] = None,
                  per_category: Optional[Dict[str, Dict[str, float]]] = None,
                  evaluator: str = "auto", detailed: bool = False,
                  kpt_oks_sigmas: Optional[Sequence[float]] = None) -> Dict[str, Dict[str, float]]:
    """Run COCOeval for each iou type in ``results`` (``"bbox"``, ``"segm"``, ``"keypoints"``) and report.

    Args:
        coco_gt: ground truth (:func:`coco_gt_from_dataset`).
        results: iou type -> COCO results (``image_id``, ``category_id``, ``score``, ``bbox`` [x,y,w,h] or
            ``segmentation`` RLE). Not modified.
        img_ids: evaluate these images only (default: every image of ``coco_gt``).
        names: category id -> name for the per-category table (default: from ``coco_gt``); when given, the
            per-category APs cover these categories only (a json's ``_background_`` category, which the dataset
            does not train, gets none).
        log: where the 12-number tables and per-category APs go (default: the ``maskrcnn.evaluation`` logger).
        per_category: when given, filled with ``{iou_type: {category name: AP}}``.
        evaluator: ``"auto"``, ``"pycocotools"`` or ``"faster_coco_eval"`` (:func:`resolve_evaluator`).
        detailed: also return the recalls (:data:`RECALL_NAMES`) and ``"AP-<category name>"`` for each category.
        kpt_oks_sigmas: OKS sigmas of the keypoints (:func:`oks_sigmas`; default COCO's for 17 keypoints).

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` in percent (NaN where undefined), plus with
        ``detailed`` ``"AR1", ..., "ARl"`` and ``"AP-<name>"``.
    """
    log = log if log is not None else logger.info
    evaluator = resolve_evaluator(evaluator)
    named_only = names is not None
    if names is None:
        names = {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(int(i) for i in img_ids)
    wanted = set(img_ids)
    if not any(a.get("image_id") in wanted and not a.get("iscrowd", 0)
               for a in coco_gt.dataset.get("annotations", [])):
        log(f"the {len(img_ids)} evaluated images have no ground-truth object (crowd regions aside): every AP and AR "
            f"is undefined (NaN), whatever the detections")
    metrics: Dict[str, Dict[str, float]] = {}
    gt_cache: Dict[str, Any] = {}
    for iou_type, dets in results.items():
        if iou_type not in IOU_TYPES:
            raise ValueError(f"evaluate_coco: unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
        stat_names = KEYPOINT_METRIC_NAMES if iou_type == "keypoints" else METRIC_NAMES + RECALL_NAMES
        main_names = stat_names[:5] if iou_type == "keypoints" else METRIC_NAMES
        dets = [d for d in dets if int(d["image_id"]) in wanted] if dets else []
        kpt_sigmas = None
        if iou_type == "keypoints" and dets:
            kpt_sigmas = oks_sigmas(len(dets[0]["keypoints"]) // 3, kpt_oks_sigmas)
        if not dets:
            log(f"{iou_type}: no detections on the {len(img_ids)} evaluated images: every AP is 0")
            metrics[iou_type] = {k: 0.0 for k in main_names}
            if detailed:
                metrics[iou_type].update({k: 0.0 for k in stat_names if k not in main_names})
                metrics[iou_type].update({f"AP-{names.get(c, str(c))}": 0.0 for c in sorted(coco_gt.getCatIds())
                                          if not named_only or c in names})
            continue
        gt = coco_gt
        if iou_type == "segm":
            gt, missing = _segm_ground_truth(coco_gt)
            if missing:
                log(f"segm: {missing} ground-truth object(s) have no usable segmentation; the mask AP ignores them "
                    f"(as crowd regions), the box AP counts them")
        per_image: Dict[int, int] = {}
        for d in dets:
            per_image[int(d["image_id"])] = per_image.get(int(d["image_id"]), 0) + 1
        crowded = sum(n > 100 for n in per_image.values())
        if crowded and iou_type != "keypoints":  # keypoints are scored at maxDets 20 by design
            log(f"{iou_type}: {crowded} image(s) have more than 100 detections (up to {max(per_image.values())}): "
                f"COCO's AP and AR count the 100 highest-scoring of each image (maxDets 100), as COCO's benchmark does")
        ev, table = _run_cocoeval(evaluator, gt, dets, iou_type, img_ids, gt_cache, kpt_sigmas)
        log(f"Evaluate annotation type *{iou_type}* on {len(img_ids)} images ({evaluator})\n{table}")
        per_cat = {c: v for c, v in _per_category_ap(ev).items() if not named_only or c in names}
        log(f"per-category {iou_type} AP:\n{_format_per_category(per_cat, names)}")
        names_and_stats = stat_names if detailed else main_names
        metrics[iou_type] = {k: (float(ev.stats[i] * 100) if ev.stats[i] >= 0 else float("nan"))
                             for i, k in enumerate(names_and_stats)}
        if detailed:
            metrics[iou_type].update({f"AP-{names.get(c, str(c))}": v for c, v in per_cat.items()})
        if per_category is not None:
            per_category[iou_type] = {names.get(c, str(c)): v for c, v in per_cat.items()}
    return metrics


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def write_metrics(path: str, metrics: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``metrics`` as json atomically (NaN becomes ``null``)."""
    from ..utils.checkpoint import atomic_write

    text = json.dumps(_json_ready(dict(metrics)), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), what="metrics file")
