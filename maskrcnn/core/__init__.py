"""Detectron's ``core.test`` API (``im_detect_all`` and friends) for BGR uint8 images as cv2 reads them."""
from .test import (box_results_with_nms_and_limit, im_detect_all, im_detect_bbox, im_detect_bbox_aug,
                   im_detect_keypoints, im_detect_keypoints_aug, im_detect_mask, im_detect_mask_aug,
                   keypoint_results, segm_results)

__all__ = [
    "im_detect_all",
    "im_detect_bbox",
    "im_detect_bbox_aug",
    "im_detect_mask",
    "im_detect_mask_aug",
    "im_detect_keypoints",
    "im_detect_keypoints_aug",
    "box_results_with_nms_and_limit",
    "segm_results",
    "keypoint_results",
]
