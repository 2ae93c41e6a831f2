"""Data: the dataset catalog, loaders (with per-item error reporting), samplers, transforms and validation.

Datasets themselves are in :mod:`maskrcnn.data.datasets`.
"""
from .build import DatasetItemError, WorkerDiedError, build_test_loader, build_train_loader
from .cache import CachedDataset
from .catalog import ConcatDataset, DatasetCatalog, DatasetSpecError, build_dataset
from .collate import collate_fn
from .export_coco import export_coco
from .stats import DatasetStats, compute_dataset_stats
from .samplers import GroupedBatchSampler, InferenceSampler, InfiniteSampler, TrainingBatchSampler
from .transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge, read_image_rgb
from .validate import UnreadableImagesError, ValidationReport, check_and_filter, validate_dataset

__all__ = [
    # catalog and loaders
    "DatasetCatalog",
    "DatasetSpecError",
    "ConcatDataset",
    "build_dataset",
    "build_train_loader",
    "build_test_loader",
    "CachedDataset",
    "collate_fn",
    "export_coco",
    "DatasetStats",
    "compute_dataset_stats",
    "DatasetItemError",
    "WorkerDiedError",
    # samplers
    "InfiniteSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "TrainingBatchSampler",
    # transforms
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "read_image_rgb",
    # validation
    "validate_dataset",
    "check_and_filter",
    "ValidationReport",
    "UnreadableImagesError",
]
