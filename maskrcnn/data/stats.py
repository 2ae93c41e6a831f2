"""Statistics of a training set that a recipe can be chosen from: image sizes, box sizes and aspect ratios, objects
per image, classes, crowd regions and empty images.

:func:`compute_dataset_stats` reads no pixels where the dataset can avoid it: COCO-format sets are read from their
json (``dataset.coco``), others through ``get_target(i)`` when they have it (Penn-Fudan reads only the instance mask)
or ``dataset[i]``. Large sets are subsampled (evenly spaced indices, deterministic).

Boxes are in the dataset's own pixels, ``x1, y1, x2, y2`` continuous convention; the box *size* is
``sqrt(w * h)``, the *aspect ratio* ``h / w`` (the convention of the anchors' ``ASPECT_RATIOS``). Crowd regions
count separately and are not boxes here (the model never trains on them as objects).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["DatasetStats", "compute_dataset_stats"]


@dataclass
class DatasetStats:
    """Per-image and per-box arrays of the images read.

    Attributes:
        num_images: length of the dataset.
        image_hw: ``(I, 2)`` float64 ``(height, width)`` of each image read.
        boxes: ``(N, 4)`` float64 ``x1, y1, x2, y2`` of every non-crowd box (its image's pixels).
        box_image: ``(N,)`` int64 row of ``image_hw`` each box belongs to.
        objects_per_image: ``(I,)`` int64 non-crowd objects per image read.
        class_counts: ``(K,)`` int64 non-crowd boxes per class (label ``k`` at index ``k - 1``).
        crowd_regions: crowd annotations seen.
        classes: class names, background first (empty when the dataset has none).
    """

    num_images: int
    image_hw: np.ndarray
    boxes: np.ndarray
    box_image: np.ndarray
    objects_per_image: np.ndarray
    class_counts: np.ndarray
    crowd_regions: int
    classes: List[str]

    @property
    def images_read(self) -> int:
        return int(len(self.image_hw))

    @property
    def num_classes(self) -> int:
        """Foreground classes (from ``classes`` when known, else the largest label seen)."""
        return max(len(self.classes) - 1, len(self.class_counts))

    @property
    def boxes_wh(self) -> np.ndarray:
        """``(N, 2)`` ``(width, height)`` of every box."""
        return self.boxes[:, 2:] - self.boxes[:, :2]

    @property
    def box_sizes(self) -> np.ndarray:
        """``(N,)`` ``sqrt(w * h)`` of every box, dataset pixels."""
        return np.sqrt(self.boxes_wh[:, 0] * self.boxes_wh[:, 1])

    @property
    def aspect_ratios(self) -> np.ndarray:
        """``(N,)`` ``h / w`` of every box."""
        return self.boxes_wh[:, 1] / self.boxes_wh[:, 0]

    @property
    def empty_images(self) -> int:
        return int((self.objects_per_image == 0).sum())

    def relative_box_sizes(self) -> np.ndarray:
        """``(N,)`` box size over the shorter side of its image (what survives any resize)."""
        return self.box_sizes / self.image_hw[self.box_image].min(1)

    def describe(self) -> List[str]:
        """Human-readable lines (the ``--auto`` log prints them)."""
        def pct(a: np.ndarray, fmt: str = "{:.0f}") -> str:
            if len(a) == 0:
                return "none"
            q = [fmt.format(v) for v in np.percentile(a, [0, 10, 50, 90, 100])]
            return f"min {q[0]}, p10 {q[1]}, median {q[2]}, p90 {q[3]}, max {q[4]}"
        short, long_ = self.image_hw.min(1), self.image_hw.max(1)
        lines = [f"{self.num_images} images ({self.images_read} read), {self.num_classes} classes, "
                 f"{len(self.boxes)} objects, {self.crowd_regions} crowd regions, {self.empty_images} empty images",
                 f"image shorter side: {pct(short)}; longer side: {pct(long_)}",
                 f"box size sqrt(w*h) px: {pct(self.box_sizes)}",
                 f"box aspect h/w: {pct(self.aspect_ratios, '{:.2f}')}",
                 f"objects per image: {pct(self.objects_per_image.astype(np.float64))}"]
        if len(self.class_counts):
            names = self.classes[1:] if len(self.classes) > 1 else [str(k + 1) for k in range(len(self.class_counts))]
            lines.append("objects per class: " + ", ".join(f"{n} {c}" for n, c in zip(names, self.class_counts)))
        return lines


def _indices(n: int, max_images: Optional[int]) -> Sequence[int]:
    if not max_images or n <= max_images:
        return range(n)
    return sorted(set(np.linspace(0, n - 1, int(max_images)).round().astype(int).tolist()))


def _coco_records(dataset, index: int):
    """``(height, width, [(x1, y1, x2, y2, label, iscrowd)])`` of a COCODataset item from its json."""
    img_id = dataset.ids[index]
    info = dataset.coco.imgs[img_id]
    height, width = float(info["height"]), float(info["width"])
    out = []
    for ann in dataset.coco.imgToAnns.get(img_id, []):
        label = dataset.category_id_to_contiguous.get(ann.get("category_id"))
        bbox = ann.get("bbox")
        if label is None or bbox is None or len(bbox) != 4:
            continue
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 > x1 and y2 > y1:
            out.append((x1, y1, x2, y2, label, int(ann.get("iscrowd", 0))))
    return height, width, out


def _item_records(dataset, index: int):
    if hasattr(dataset, "get_target") and hasattr(dataset, "get_image_info"):
        info = dataset.get_image_info(index)
        target = dataset.get_target(index)
        height, width = float(info["height"]), float(info["width"])
    else:
        image, target = dataset[index]
        height, width = float(image.shape[-2]), float(image.shape[-1])
    boxes = target["boxes"].reshape(-1, 4).tolist()
    labels = target["labels"].reshape(-1).tolist()
    crowd = target.get("iscrowd")
    crowd = [0] * len(labels) if crowd is None else [int(c) for c in crowd.reshape(-1).tolist()]
    return height, width, [(*b, int(lab), c) for b, lab, c in zip(boxes, labels, crowd)]


def compute_dataset_stats(dataset, max_images: Optional[int] = 500) -> DatasetStats:
    """Statistics of ``dataset`` from at most ``max_images`` of its images (None or 0: all).

    Raises ValueError for an empty dataset or one without any object in the images read.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"compute_dataset_stats: {dataset!r} is empty")
    is_coco = hasattr(dataset, "coco") and hasattr(dataset, "ids") and hasattr(dataset, "category_id_to_contiguous")
    hw: List[tuple] = []
    boxes: List[tuple] = []
    owner: List[int] = []
    per_image: List[int] = []
    counts: Dict[int, int] = {}
    crowd_regions = 0
    for row, index in enumerate(_indices(n, max_images)):
        height, width, records = _coco_records(dataset, index) if is_coco else _item_records(dataset, index)
        hw.append((height, width))
        objects = 0
        for x1, y1, x2, y2, label, crowd in records:
            if crowd:
                crowd_regions += 1
                continue
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            boxes.append((x1, y1, x2, y2))
            owner.append(row)
            counts[label] = counts.get(label, 0) + 1
            objects += 1
        per_image.append(objects)
    if not boxes:
        raise ValueError(f"compute_dataset_stats: no (non-crowd) object in the {len(hw)} images read of {dataset!r}")
    classes = [str(c) for c in (getattr(dataset, "classes", None) or [])]
    k = max(max(counts), len(classes) - 1)
    return DatasetStats(
        num_images=n, image_hw=np.asarray(hw, dtype=np.float64), boxes=np.asarray(boxes, dtype=np.float64),
        box_image=np.asarray(owner, dtype=np.int64), objects_per_image=np.asarray(per_image, dtype=np.int64),
        class_counts=np.asarray([counts.get(c, 0) for c in range(1, k + 1)], dtype=np.int64),
        crowd_regions=crowd_regions, classes=classes)
