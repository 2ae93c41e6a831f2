"""Write any dataset of this package (items ``(image, target)``) as a COCO-format json plus PNG images.

The result is what a user brings: ``coco:OUT/annotations.json:OUT/images`` reads it back through
:class:`~maskrcnn.data.datasets.coco.COCODataset`, so every tool treats an exported synthetic set exactly as a user's
COCO data (the images are quantised to 8 bits on the way; boxes, labels, ``iscrowd`` and masks are exact).

Masks are written as compressed RLE (exact, and what COCO uses for crowd regions); ``bbox`` is ``[x, y, w, h]`` of
the target box, ``area`` the mask's pixel count, categories ``1..K`` named after ``dataset.classes``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch

__all__ = ["export_coco"]


def export_coco(dataset, out_dir: str, num_images: Optional[int] = None, json_name: str = "annotations.json",
                image_dir: str = "images") -> str:
    """Write ``dataset`` (or its first ``num_images`` items) under ``out_dir``; returns the json's path.

    Layout: ``out_dir/json_name`` and ``out_dir/image_dir/<file>.png`` (file names from ``get_image_info`` when it
    gives one, else the index).
    """
    classes = list(getattr(dataset, "classes", []) or [])
    if len(classes) < 2:
        raise ValueError(f"export_coco: {dataset!r} has no class names (dataset.classes with the background first)")
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for index in range(n):
        image, target = dataset[index]
        height, width = int(image.shape[1]), int(image.shape[2])
        name = f"{index:06d}.png"
        if hasattr(dataset, "get_image_info"):
            name = os.path.basename(str(dataset.get_image_info(index).get("file_name") or name))
        pixels = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = os.path.join(out_dir, image_dir, name)
        if not cv2.imwrite(path, np.ascontiguousarray(pixels[:, :, ::-1])):
            raise OSError(f"export_coco: could not write {path}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        boxes = target["boxes"].reshape(-1, 4).tolist()
        labels = target["labels"].tolist()
        masks = target["masks"].numpy().astype(np.uint8)
        crowd = target.get("iscrowd")
        crowd = [0] * len(labels) if crowd is None else [int(c) for c in crowd.tolist()]
        for k, (box, label) in enumerate(zip(boxes, labels)):
            rle = mask_util.encode(np.asfortranarray(masks[k]))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
                                "area": float(masks[k].sum()), "iscrowd": crowd[k]})
    data = {"info": {"description": f"exported from {dataset!r}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": k, "name": str(c)} for k, c in enumerate(classes) if k > 0]}
    json_path = os.path.join(out_dir, json_name)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return json_path
