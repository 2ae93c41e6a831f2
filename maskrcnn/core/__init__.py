"""Detectron's ``core.test`` API (``im_detect_all`` and friends) for BGR uint8 images as cv2 reads them."""
from .test import box_results_with_nms_and_limit, im_detect_all, im_detect_bbox, im_detect_mask, segm_results

__all__ = [
    "im_detect_all",
    "im_detect_bbox",
    "im_detect_mask",
    "box_results_with_nms_and_limit",
    "segm_results",
]
