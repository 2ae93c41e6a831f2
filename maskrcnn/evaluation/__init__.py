"""COCO-style box and mask evaluation (pycocotools) of a dataset's predictions."""
from .coco import (EVALUATORS, METRIC_NAMES, RECALL_NAMES, coco_gt_from_dataset, evaluate_coco, mask_to_rle,
                   resolve_evaluator, write_metrics)

__all__ = [
    "EVALUATORS",
    "METRIC_NAMES",
    "RECALL_NAMES",
    "coco_gt_from_dataset",
    "evaluate_coco",
    "mask_to_rle",
    "resolve_evaluator",
    "write_metrics",
]
