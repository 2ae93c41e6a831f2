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
lying entirely outside the image, and segmentations without a usable polygon (fewer than 3 points) are dropped with a
``warnings.warn`` naming the annotation id. A category named ``_background_`` (labelme writes one) or
``__background__`` is not a class.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import read_image_rgb, to_float_tensor

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

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index.
        ids: COCO image id of each dataset index (ascending).
        classes: class names, ``classes[0] == "__background__"``.
        category_id_to_contiguous / contiguous_to_category_id: label maps for reading and writing results.
    """

    def __init__(self, ann_file: str, image_dir: str, remove_images_without_annotations: bool = False,
                 transforms=None):
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCODataset: annotation file not found: {ann_file}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"COCODataset: image_dir is not a folder: {image_dir} (ann_file {ann_file})")
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.transforms = transforms
        # pycocotools prints progress lines on load; keep library use silent.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.coco = COCO(ann_file)
            except Exception as e:
                raise ValueError(f"COCODataset: could not parse {ann_file} as COCO json: {e}") from e

        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        cats = [c for c in cats if c.get("name") not in BACKGROUND_CATEGORY_NAMES]
        if not cats:
            raise ValueError(f"COCODataset: {ann_file} has no (non-background) categories")
        self.category_id_to_contiguous: Dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.contiguous_to_category_id: Dict[int, int] = {v: k for k, v in self.category_id_to_contiguous.items()}
        self.classes: List[str] = ["__background__"] + [str(c["name"]) for c in cats]

        self._records: Dict[int, List[Dict[str, Any]]] = {}
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            anns = self.coco.imgToAnns.get(img_id, [])
            self._records[img_id] = [r for r in (self._parse_annotation(a, info) for a in anns) if r is not None]

        ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            ids = [i for i in ids if any(not r["iscrowd"] for r in self._records[i])]
        self.ids: List[int] = ids

    # --- annotation parsing (once, at construction) ------------------------------------------------------------------
    def _drop(self, ann: Dict[str, Any], why: str) -> None:
        warnings.warn(f"COCODataset({self.ann_file}): dropping annotation id {ann.get('id')} "
                      f"(image id {ann.get('image_id')}): {why}", stacklevel=3)

    def _parse_annotation(self, ann: Dict[str, Any], info: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        height, width = int(info["height"]), int(info["width"])
        cat = ann.get("category_id")
        if cat not in self.category_id_to_contiguous:
            self._drop(ann, f"category_id {cat!r} is not a foreground category")
            return None
        bbox = ann.get("bbox")
        if bbox is None or len(bbox) != 4:
            self._drop(ann, f"bbox must be [x, y, w, h], got {bbox!r}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            self._drop(ann, f"non-finite bbox {bbox!r}")
            return None
        if w <= 0 or h <= 0:
            self._drop(ann, f"degenerate bbox {bbox!r} (w and h must be > 0)")
            return None
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            self._drop(ann, f"bbox {bbox!r} lies outside the {width}x{height} image")
            return None

        segm = ann.get("segmentation")
        if isinstance(segm, list):
            # A polygon needs >= 3 points; pycocotools would also read a 4-number "polygon" as a box.
            polys = [list(map(float, p)) for p in segm if len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                self._drop(ann, "segmentation has no polygon with at least 3 points")
                return None
            segm = polys
        elif isinstance(segm, dict):
            size = [int(s) for s in segm.get("size", [])]
            if size != [height, width] or "counts" not in segm:
                raise ValueError(f"COCODataset({self.ann_file}): RLE of annotation id {ann.get('id')} has size "
                                 f"{segm.get('size')!r} but image id {info['id']} is {height}x{width}")
        else:
            self._drop(ann, f"missing or unsupported segmentation {type(segm).__name__}")
            return None
        area = ann.get("area")
        return {
            "id": ann.get("id"),
            "label": self.category_id_to_contiguous[cat],
            "box": (x1, y1, x2, y2),
            "segmentation": segm,
            "area": float(area) if area is not None else None,
            "iscrowd": int(ann.get("iscrowd", 0)),
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
        return len(self.ids)

    def get_image_info(self, index: int) -> Dict[str, Any]:
        """``{"file_name", "height", "width", "id"}`` of dataset item ``index`` from the json (no pixels read)."""
        info = self.coco.imgs[self.ids[index]]
        return {"file_name": info["file_name"], "height": int(info["height"]), "width": int(info["width"]),
                "id": int(info["id"])}

    def image_path(self, index: int) -> str:
        """Path of item ``index``'s image: ``image_dir/file_name``, else relative to the json's folder."""
        info = self.coco.imgs[self.ids[index]]
        first = os.path.join(self.image_dir, info["file_name"])
        if os.path.exists(first):
            return first
        second = os.path.join(os.path.dirname(os.path.abspath(self.ann_file)), info["file_name"])
        if os.path.exists(second):
            return second
        raise FileNotFoundError(f"COCODataset: image {info['file_name']!r} of image id {info['id']} not found "
                                f"(tried {first} and {second})")

    def get_target(self, index: int) -> Dict[str, Tensor]:
        """The target of item ``index`` (masks decoded) without reading the image."""
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        height, width = int(info["height"]), int(info["width"])
        records = self._records[img_id]
        n = len(records)
        if n:
            rles = [self._to_rle(r["segmentation"], height, width) for r in records]
            # decode of a list returns (H, W, N) in Fortran order.
            masks = torch.from_numpy(np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1)))
            areas = [r["area"] if r["area"] is not None else float(m.sum()) for r, m in zip(records, masks)]
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
            areas = []
        return {
            "boxes": torch.tensor([r["box"] for r in records], dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor([r["label"] for r in records], dtype=torch.int64),
            "masks": masks.to(torch.uint8),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor([r["iscrowd"] for r in records], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        path = self.image_path(index)
        rgb = read_image_rgb(path)
        info = self.coco.imgs[self.ids[index]]
        if rgb.shape[:2] != (int(info["height"]), int(info["width"])):
            raise ValueError(f"COCODataset: image {path} (image id {info['id']}) is {rgb.shape[0]}x{rgb.shape[1]} "
                             f"but {self.ann_file} says {info['height']}x{info['width']}")
        image, target = to_float_tensor(rgb), self.get_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"COCODataset(ann_file={self.ann_file!r}, image_dir={self.image_dir!r}, images={len(self)}, "
                f"classes={len(self.classes) - 1})")
