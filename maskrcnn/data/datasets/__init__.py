"""Datasets: COCO-format json + images, Penn-Fudan pedestrians, synthetic shapes and the synthetic family of
variants (no files needed).

Items are ``(image, target)``: a ``(3, H, W)`` float RGB tensor in ``[0, 1]`` and
``{"boxes": (G, 4) x1y1x2y2, "labels": (G,) int64 in 1..K, "masks": (G, H, W) uint8, ...}``.
"""
from .coco import COCODataset
from .pennfudan import PennFudanDataset
from .synthetic import SyntheticShapesDataset
from .synthetic_family import SyntheticFamilyDataset

__all__ = ["COCODataset", "PennFudanDataset", "SyntheticShapesDataset", "SyntheticFamilyDataset"]
