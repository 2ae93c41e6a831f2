"""COCO-format instance segmentation datasets (COCO itself, and json files written by labelme and similar tools).

Item contract (torchvision's detection tutorial): ``dataset[i] -> (image, target)`` with

* ``image``: ``(3, H, W)`` float32 RGB in ``[0, 1]``;
* ``target["boxes"]``: ``(N, 4)`` float32 ``x1, y1, x2, y2`` absolute pixels, continuous convention
  (COCO ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``), clipped to the image;
* ``target["labels"]``: ``(N,)`` int64 contiguous labels ``1..K`` (category ids sorted ascending);
* ``target["masks"]``: ``(N, H, W)`` uint8 {0, 1}, crowd regions included;
* ``target["image_id"]``: int64 scalar tensor, the COCO image id;
* ``target["area"]``: ``(N,)`` float32, the annotation's ``area`` (segmentation area, as COCO evaluation uses);
* ``target["iscrowd"]``: ``(N,)`` int64; crowd instances stay in the target and the model ignores them.

Annotations are validated once, when the dataset is built: boxes with ``w <= 0``, ``h <= 0``, non-finite values or
lying entirely outside the image, segmentations without a usable polygon (fewer than 3 points), RLEs whose size is
not the image's, undeclared categories and annotations of image ids absent from the json are dropped; boxes partly
outside the image are clipped. All of them are collected in ``annotation_problems`` and reported by *one*
``warnings.warn`` (count per kind, first examples with annotation id, image id and file); see
:mod:`maskrcnn.data.validate`. An image with no objects stays (a negative image). A category named ``_background_`` (labelme writes one) or
``__background__`` is not a class.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import keypoint_flip_indices, read_image_rgb, to_float_tensor
from ..validate import DataProblem, summarize_problems
from .coco_index import PackedAnnotationIndex, PackedIndexBuilder

__all__ = ["COCODataset", "BACKGROUND_CATEGORY_NAMES"]

#: Category names that denote the background rather than a class (labelme's quirk, Detectron's name).
BACKGROUND_CATEGORY_NAMES = ("_background_", "__background__")


class COCODataset(Dataset):
    """A COCO-format json plus an image folder.

    Args:
        ann_file: path of the COCO json.
        image_dir: folder the images' ``file_name`` is relative to. When ``image_dir/file_name`` does not exist,
            the path relative to the json's folder is tried (labelme writes ``file_name`` with a folder prefix).
        remove_images_without_annotations: keep only images with at least one valid non-crowd annotation
            (Detectron's training filter).
        transforms: optional ``t(image, target) -> (image, target)`` applied to each item.
        max_image_side: images whose longer side exceeds this are decoded at reduced resolution and resized so the
            longer side is ``max_image_side`` (memory stays bounded for e.g. 12000x9000 photos); boxes, masks and
            ``area`` are scaled to match. ``None``: no limit.
        box_masks: an annotation without a segmentation (a box-only one) gets its box as its mask instead of being
            dropped, for models that learn no mask (``MODEL.MASK_ON False``, as the tools set it); a mask model
            must not learn from these rectangles.

    The annotations are parsed and validated once, into a packed index (numpy arrays, see
    :mod:`maskrcnn.data.datasets.coco_index`) that DataLoader workers share without copying; an item's records are
    decoded when it is read (:meth:`records`).

    Attributes:
        coco: the ``pycocotools.coco.COCO`` of the json, read on first access (evaluation's ground truth).
        ids: COCO image id of each dataset index (ascending).
        classes: class names, ``classes[0] == "__background__"``.
        category_id_to_contiguous / contiguous_to_category_id: label maps for reading and writing results.
    """

    def __init__(self, ann_file: str, image_dir: str, remove_images_without_annotations: bool = False,
                 transforms=None, max_image_side: Optional[int] = None, box_masks: bool = False):
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCODataset: annotation file not found: {ann_file}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCODataset: image_dir is not a folder: {image_dir} (ann_file {ann_file})")
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.transforms = transforms
        if max_image_side is not None and int(max_image_side) <= 0:
            raise ValueError(f"COCODataset: max_image_side must be positive or None, got {max_image_side!r}")
        self.max_image_side = None if max_image_side is None else int(max_image_side)
        self.box_masks = bool(box_masks)
        self._coco: Optional[COCO] = None
        data = self._read_json(ann_file)

        all_cats = {c["id"]: c for c in data["categories"]}
        cats = sorted(all_cats.values(), key=lambda c: c["id"])
        cats = [c for c in cats if c.get("name") not in BACKGROUND_CATEGORY_NAMES]
        if not cats:
            raise ValueError(f"COCODataset: {ann_file} has no (non-background) categories")
        self._declared_categories = frozenset(all_cats)
        self.category_id_to_contiguous: Dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.contiguous_to_category_id: Dict[int, int] = {v: k for k, v in self.category_id_to_contiguous.items()}
        self.classes: List[str] = ["__background__"] + [str(c["name"]) for c in cats]
        shared = sorted({n for n in self.classes[1:] if self.classes.count(n) > 1})
        if shared:
            # Two classes the model learns apart under one name: the drawings, class_names and the per-class APs
            # cannot tell them apart, and a test json with the same names in another order is not caught.
            ids = {n: [c["id"] for c in cats if str(c["name"]) == n] for n in shared}
            warnings.warn(f"COCODataset({ann_file}): categories share a name: " + "; ".join(
                f"{n!r} for ids {v}" for n, v in ids.items()) + "; they are trained as separate classes; give each "
                "category its own name (or merge their ids) if that is not intended", stacklevel=2)
        # Kept from the json (not the lazily built pycocotools index, which stays unbuilt for training): the keypoint
        # names of the category declaring the most keypoints.
        self._keypoint_names: List[str] = list(max((c.get("keypoints") or [] for c in all_cats.values()), key=len,
                                                   default=[]))

        #: Problems found while parsing (instances dropped or clipped); see :mod:`maskrcnn.data.validate`.
        self.annotation_problems: List[DataProblem] = []
        #: Objects kept (non-crowd annotations), and of them those given their box as mask (``box_masks``).
        self.num_objects = 0
        self.box_masked = 0
        self._index = self._build_index(data)
        del data
        keep = self._index.has_non_crowd() if remove_images_without_annotations else None
        rows = np.arange(len(self._index), dtype=np.int64)
        # dataset index -> row of the packed index (numpy, so that forked workers share it).
        self._rows: np.ndarray = rows if keep is None else rows[keep]
        dropped = [p for p in self.annotation_problems if not p.kind.endswith("clipped")]
        if dropped and len(self._index) and not self._index.has_non_crowd().any():
            # Every object was dropped: training would run on nothing (zero box losses) and evaluation would score
            # nothing, both without an error.
            # The hint for box-only annotations only where segmentations were the problem (not, e.g., image ids
            # that match no image).
            hint = (" (a mask model needs a 'segmentation' per object; box-only annotations train a box-only model: "
                    "MODEL.MASK_ON False)" if any(p.kind == "bad_segmentation" for p in dropped) else "")
            raise ValueError(summarize_problems(
                self.annotation_problems, 5,
                f"COCODataset({self.ann_file}): all {len(dropped)} annotation(s) were dropped, no object is "
                f"left{hint}:"))
        if self.annotation_problems:
            warnings.warn(summarize_problems(
                self.annotation_problems, 5,
                f"COCODataset({self.ann_file}): {len(self.annotation_problems)} annotation problem(s); bad instances "
                f"dropped, partial boxes clipped:"), stacklevel=2)

    def _build_index(self, data: Dict[str, Any]) -> PackedAnnotationIndex:
        """Parse every annotation of ``data`` (images by ascending id, each image's annotations in json order) into
        the packed index. Annotations are released as they are parsed, so the peak stays near the json's size."""
        builder = PackedIndexBuilder()
        infos: Dict[int, Dict[str, Any]] = {}
        for k, img in enumerate(data["images"]):
            img_id = img["id"]
            if isinstance(img_id, bool) or not isinstance(img_id, int):
                raise ValueError(f"COCODataset: {self.ann_file}: images[{k}] id must be an integer, got {img_id!r}")
            if img_id in infos:
                raise ValueError(f"COCODataset: {self.ann_file}: image id {img_id} appears twice in 'images' "
                                 f"({infos[img_id]['file_name']!r} and {img['file_name']!r}); ids must be unique")
            infos[img_id] = img
        for img_id in sorted(infos):
            info = infos[img_id]
            builder.add_image(img_id, int(info["height"]), int(info["width"]), info["file_name"])
        rank = {img_id: r for r, img_id in enumerate(sorted(infos))}
        anns = data["annotations"]
        where = np.empty(len(anns), dtype=np.int64)
        for k, ann in enumerate(anns):
            if not isinstance(ann, dict):
                raise ValueError(f"COCODataset: {self.ann_file}: annotations[{k}] must be a json object, got "
                                 f"{type(ann).__name__}")
            r = rank.get(ann.get("image_id"), -1)
            if r < 0:
                img_id = ann.get("image_id")
                quoted = isinstance(img_id, str) and img_id.strip().lstrip("-").isdigit() and int(img_id) in rank
                self._problem("missing_image", ann, None, f"image id {img_id!r} is not in 'images'" + (
                    f" (a string: 'images' has the integer {int(img_id)}; write ids as json numbers)" if quoted
                    else ""))
            where[k] = r
        for k in np.argsort(where, kind="stable")[np.searchsorted(np.sort(where), 0):].tolist():
            ann, anns[k] = anns[k], None
            info = infos[ann["image_id"]]
            record = self._parse_annotation(ann, info)
            if record is not None and record["id"] is not None and (
                    isinstance(record["id"], bool) or not isinstance(record["id"], int)):
                raise ValueError(f"COCODataset: {self.ann_file}: annotation id {record['id']!r} (image id "
                                 f"{ann['image_id']}) must be an integer")
            if record is not None:
                builder.add_record(ann["image_id"], record)
                self.num_objects += not record["iscrowd"]
        return builder.build()

    @staticmethod
    def _read_json(ann_file: str) -> Dict[str, Any]:
        """The json of ``ann_file``, checked: an object with lists ``images`` (each with ``id``, ``file_name``,
        ``height``, ``width``) and ``categories`` (each with ``id``); ``annotations`` defaults to ``[]``."""
        try:
            with open(ann_file, "rb") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"COCODataset: {ann_file} is not valid json (truncated or corrupt?): {e.msg} at line "
                             f"{e.lineno} column {e.colno} (char {e.pos})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"COCODataset: cannot read {ann_file}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"COCODataset: {ann_file} must hold a json object, got {type(data).__name__}")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"COCODataset: {ann_file} has no list {key!r} (keys: {sorted(data)})")
        for k, img in enumerate(data["images"]):
            missing = [f for f in ("id", "file_name", "height", "width") if f not in img]
            if missing:
                raise ValueError(f"COCODataset: {ann_file}: images[{k}] lacks {missing}")
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or "id" not in cat:
                raise ValueError(f"COCODataset: {ann_file}: categories[{k}] must be an object with an 'id', got "
                                 f"{cat!r}")
        data.setdefault("annotations", [])
        if not isinstance(data["annotations"], list):
            raise ValueError(f"COCODataset: {ann_file}: 'annotations' must be a list, got "
                             f"{type(data['annotations']).__name__}")
        return data

    @staticmethod
    def _load_coco(ann_file: str) -> COCO:
        data = COCODataset._read_json(ann_file)
        COCODataset._number_annotations(ann_file, data)
        coco = COCO()
        coco.dataset = data
        # pycocotools prints progress lines while indexing; keep library use silent.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                coco.createIndex()
            except Exception as e:
                raise ValueError(f"COCODataset: could not index {ann_file} as COCO json: {type(e).__name__}: {e}") from e
        return coco

    @staticmethod
    def _number_annotations(ann_file: str, data: Dict[str, Any]) -> None:
        """Give each annotation of ``data`` without an ``id``, or with the ``id`` of an earlier one, a new unique id
        (above the largest given), in place. pycocotools indexes annotations by id: it fails on a missing one and
        silently keeps one of two sharing an id, which drops an object from the evaluation. Training never needs
        the ids (and leaves them alone); the evaluation's ground truth does."""
        seen, redo = set(), []
        for ann in (a for a in data["annotations"] if isinstance(a, dict)):
            ann_id = ann.get("id")
            if ann_id is None or ann_id in seen or isinstance(ann_id, bool) or not isinstance(ann_id, int):
                redo.append(ann)
            else:
                seen.add(ann_id)
        if not redo:
            return
        missing = sum("id" not in a for a in redo)
        start = max(seen, default=0) + 1
        for k, ann in enumerate(redo):
            ann["id"] = start + k
        warnings.warn(f"COCODataset({ann_file}): {missing} annotation(s) without an 'id' and {len(redo) - missing} "
                      f"with the id of an earlier one (or a non-integer id) were given new ids {start}.."
                      f"{start + len(redo) - 1} for the evaluation's ground truth; give every annotation a unique "
                      f"integer 'id' to keep your own", stacklevel=3)

    @property
    def coco(self) -> COCO:
        """The ``pycocotools.coco.COCO`` of the json (the evaluation's ground truth), read on first use: training
        never needs it, and the packed index is all an item read uses."""
        if self._coco is None:
            self._coco = self._load_coco(self.ann_file)
        return self._coco

    @coco.setter
    def coco(self, value: COCO) -> None:
        self._coco = value

    @property
    def ids(self) -> List[int]:
        """COCO image id of each dataset index, ascending (a new list on each access)."""
        return self._index.image_ids[self._rows].tolist()

    def __getstate__(self) -> Dict[str, Any]:
        # Workers started by spawn get the packed arrays, not the (large, lazily built) pycocotools index.
        state = dict(self.__dict__)
        state["_coco"] = None
        return state

    def records(self, index: int) -> List[Dict[str, Any]]:
        """The parsed annotations of item ``index`` (valid ones, json order): ``{"id", "label", "box" (x1, y1, x2,
        y2 clipped), "segmentation" (polygons or RLE dict), "area" (None when the json has none), "iscrowd"}``."""
        return self._index.records(int(self._rows[index]))

    # --- annotation parsing (once, at construction) ------------------------------------------------------------------
    def _problem(self, kind: str, ann: Dict[str, Any], info: Optional[Dict[str, Any]], why: str) -> None:
        self.annotation_problems.append(DataProblem(
            kind, f"annotation id {ann.get('id')} (image id {ann.get('image_id')}): {why}", image_id=ann.get("image_id"),
            ann_id=ann.get("id"), file=None if info is None else info.get("file_name")))

    def _parse_annotation(self, ann: Dict[str, Any], info: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        height, width = int(info["height"]), int(info["width"])
        cat = ann.get("category_id")
        if cat not in self.category_id_to_contiguous:
            declared = cat in self._declared_categories
            self._problem("background_category" if declared else "undeclared_category", ann, info,
                          f"category_id {cat!r} is " + ("a background category" if declared else
                                                        "not declared in 'categories'"))
            return None
        bbox = ann.get("bbox")
        if bbox is None or len(bbox) != 4:
            self._problem("bad_box", ann, info, f"bbox must be [x, y, w, h], got {bbox!r}")
            return None
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            self._problem("bad_box", ann, info, f"bbox values must be numbers, got {bbox!r}")
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            self._problem("nonfinite_box", ann, info, f"non-finite bbox {bbox!r}")
            return None
        if w <= 0 or h <= 0:
            self._problem("degenerate_box", ann, info, f"degenerate bbox {bbox!r} (w and h must be > 0)")
            return None
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            self._problem("box_outside_image", ann, info, f"bbox {bbox!r} lies outside the {width}x{height} image")
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            self._problem("box_clipped", ann, info, f"bbox {bbox!r} clipped to the {width}x{height} image (kept)")

        segm = ann.get("segmentation")
        if self.box_masks and (segm is None or segm == []):
            segm = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            self.box_masked += not int(ann.get("iscrowd", 0))
        if isinstance(segm, list):
            if segm and not all(isinstance(p, (list, tuple)) for p in segm):
                self._problem("bad_segmentation", ann, info, "polygons must be a list of [x1, y1, x2, y2, ...] lists; "
                              "got a flat list (wrap one polygon in brackets: [[x1, y1, ...]])")
                return None
            # A polygon needs >= 3 points; pycocotools would also read a 4-number "polygon" as a box.
            polys = [list(map(float, p)) for p in segm if len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                self._problem("short_polygon", ann, info, "segmentation has no polygon with at least 3 points")
                return None
            segm = polys
        elif isinstance(segm, dict):
            size = [int(s) for s in segm.get("size", [])]
            if size != [height, width] or "counts" not in segm:
                self._problem("rle_size_mismatch", ann, info, f"RLE size {segm.get('size')!r} (counts "
                              f"{'present' if 'counts' in segm else 'missing'}) but the image is {height}x{width}")
                return None
            if isinstance(segm["counts"], list) and not all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in segm["counts"]):
                self._problem("bad_segmentation", ann, info, "uncompressed RLE counts must be non-negative integers")
                return None
        else:
            self._problem("bad_segmentation", ann, info, f"missing or unsupported segmentation {type(segm).__name__}")
            return None
        area = ann.get("area")
        return {
            "id": ann.get("id"),
            "label": self.category_id_to_contiguous[cat],
            "box": (x1, y1, x2, y2),
            "segmentation": segm,
            "area": float(area) if area is not None else None,
            "iscrowd": int(ann.get("iscrowd", 0)),
            "keypoints": ann.get("keypoints"),
        }

    @staticmethod
    def _to_rle(segm, height: int, width: int):
        if isinstance(segm, list):
            return mask_util.merge(mask_util.frPyObjects(segm, height, width))
        if isinstance(segm["counts"], list):
            return mask_util.frPyObjects(segm, height, width)  # uncompressed RLE
        return segm  # compressed RLE (str or bytes counts)

    # --- Dataset API -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def _image(self, index: int) -> Tuple[int, int, int, str]:
        """``(image id, height, width, file_name)`` of item ``index`` as the json records them."""
        if not -len(self._rows) <= index < len(self._rows):
            raise IndexError(f"COCODataset: index {index} out of range for {len(self._rows)} images")
        pos = int(self._rows[index])
        idx = self._index
        return int(idx.image_ids[pos]), int(idx.heights[pos]), int(idx.widths[pos]), idx.file_name(pos)

    def get_image_info(self, index: int) -> Dict[str, Any]:
        """``{"file_name", "height", "width", "id"}`` of dataset item ``index`` from the json (no pixels read)."""
        img_id, height, width, file_name = self._image(index)
        return {"file_name": file_name, "height": height, "width": width, "id": img_id}

    def image_path(self, index: int) -> str:
        """Path of item ``index``'s image: ``image_dir/file_name``, else relative to the json's folder."""
        img_id, _, _, file_name = self._image(index)
        first = os.path.join(self.image_dir, file_name)
        if os.path.exists(first):
            return first
        second = os.path.join(os.path.dirname(os.path.abspath(self.ann_file)), file_name)
        if os.path.exists(second):
            return second
        raise FileNotFoundError(f"COCODataset: image {file_name!r} of image id {img_id} not found "
                                f"(tried {first} and {second})")

    def image_files(self, index: int) -> List[Tuple[str, Tuple[int, int]]]:
        """``[(image path, (height, width) the json records)]`` (for :func:`maskrcnn.data.validate.validate_dataset`)."""
        _, height, width, _ = self._image(index)
        return [(self.image_path(index), (height, width))]

    def get_target(self, index: int, size: Optional[Tuple[int, int]] = None) -> Dict[str, Tensor]:
        """The target of item ``index`` (masks decoded) without reading the image.

        ``size``: ``(h, w)`` the image was resized to (``max_image_side``); boxes and ``area`` are scaled and masks
        are produced at that size (polygons rasterised at it directly, RLEs decoded one at a time and resized
        nearest, so no full-resolution mask stack is ever held). ``None``: the json's size.
        """
        img_id, height, width, _ = self._image(index)
        out_h, out_w = (height, width) if size is None else (int(size[0]), int(size[1]))
        sx, sy = out_w / width, out_h / height
        records = self.records(index)
        n = len(records)
        if n and (out_h, out_w) == (height, width):
            rles = [self._to_rle(r["segmentation"], height, width) for r in records]
            # decode of a list returns (H, W, N) in Fortran order.
            masks = torch.from_numpy(np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1)))
            areas = [r["area"] if r["area"] is not None else float(m.sum()) for r, m in zip(records, masks)]
        elif n:
            planes = []
            for r in records:
                segm = r["segmentation"]
                if isinstance(segm, list):
                    scaled = [[v * (sx if k % 2 == 0 else sy) for k, v in enumerate(p)] for p in segm]
                    planes.append(mask_util.decode(self._to_rle(scaled, out_h, out_w)))
                else:
                    full = mask_util.decode(self._to_rle(segm, height, width))
                    planes.append(cv2.resize(full, (out_w, out_h), interpolation=cv2.INTER_NEAREST))
            masks = torch.from_numpy(np.stack(planes))
            areas = [r["area"] * sx * sy if r["area"] is not None else float(m.sum()) for r, m in zip(records, masks)]
        else:
            masks = torch.zeros((0, out_h, out_w), dtype=torch.uint8)
            areas = []
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        out = self._keypoints(records, sx, sy)
        return {**out, 
            "boxes": torch.tensor([r["box"] for r in records], dtype=torch.float32).reshape(n, 4) * scale,
            "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64),
            "masks": masks.to(torch.uint8),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor([r["iscrowd"] for r in records], dtype=torch.int64),
        }

    @property
    def num_keypoints(self) -> int:
        """Keypoints per instance declared by the json's categories (``categories[i]["keypoints"]`` names; the
        largest list), 0 for a dataset without keypoints."""
        return len(self._keypoint_names)

    @property
    def keypoint_flip_indices(self) -> Optional[Tensor]:
        """``(K,)`` mirror index of each keypoint under a horizontal flip, from the category's keypoint names
        (``left_*`` <-> ``right_*``); None without keypoints."""
        return keypoint_flip_indices(self._keypoint_names) if self._keypoint_names else None

    def _keypoints(self, records, sx: float, sy: float) -> Dict[str, Tensor]:
        """``{"keypoints": (N, K, 3) float32 x, y, visibility}`` (COCO's ``[x1, y1, v1, ...]``, scaled to the
        output size; instances without keypoints get zeros, i.e. invisible), or ``{}`` for a dataset without."""
        k = self.num_keypoints
        if k == 0:
            return {}
        kps = torch.zeros((len(records), k, 3), dtype=torch.float32)
        for i, r in enumerate(records):
            values = r.get("keypoints")
            if values:
                if len(values) != 3 * k:
                    raise ValueError(f"COCODataset {self.ann_file}: annotation {r.get('id')} has {len(values)} "
                                     f"keypoint values, expected 3 * {k} (x, y, visibility per keypoint)")
                kps[i] = torch.tensor(values, dtype=torch.float32).reshape(k, 3)
        kps[..., 0] *= sx
        kps[..., 1] *= sy
        return {"keypoints": kps}

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        path = self.image_path(index)
        img_id, height, width, _ = self._image(index)
        rgb = read_image_rgb(path, max_side=self.max_image_side, image_id=img_id)
        size = None
        if rgb.shape[:2] != (height, width):
            h, w = rgb.shape[:2]
            # A reduced image keeps the aspect ratio up to rounding (one pixel per side).
            reduced = (self.max_image_side is not None and max(height, width) > self.max_image_side
                       and max(h, w) == self.max_image_side and abs(h * width - w * height) <= max(height, width))
            if not reduced:
                raise ValueError(f"COCODataset: image {path} (image id {img_id}) is {h}x{w} but {self.ann_file} "
                                 f"says {height}x{width}")
            size = (h, w)
        image, target = to_float_tensor(rgb), self.get_target(index, size)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"COCODataset(ann_file={self.ann_file!r}, image_dir={self.image_dir!r}, images={len(self)}, "
                f"classes={len(self.classes) - 1})")
