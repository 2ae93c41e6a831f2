"""Box, RoI and mask operations: pure functions and small modules that know nothing of configs or models.

Boxes are ``(N, 4)`` float ``x1, y1, x2, y2`` in absolute pixels; RoIs are ``(R, 5)`` with the batch
index first. ``nms``/``batched_nms``/``roi_align``/``roi_pool`` run a pure-PyTorch ("native") or
torchvision's compiled implementation, chosen by :func:`set_backend` / ``MASKRCNN_OPS_BACKEND``.
Every op traces with ``torch.jit.trace`` into a graph valid for other input sizes.
"""

from maskrcnn.ops._backend import get_backend, set_backend, use_backend
from maskrcnn.ops._errors import OpArgumentError, RoIShapeError
from maskrcnn.ops.box_coder import BoxCoder
from maskrcnn.ops.box_voting import BOX_VOTING_METHODS, BoxVoting, box_voting
from maskrcnn.ops.boxes import (
    box_area,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    boxes_to_rois,
    clip_boxes_to_image,
    flip_boxes,
    remove_small_boxes,
)
from maskrcnn.ops.grid_paste import paste_masks_grid_sample
from maskrcnn.ops.losses import smooth_l1_loss
from maskrcnn.ops.masks import (
    MASK_PASTE_METHODS,
    paste_masks_by_method,
    paste_masks_in_image,
    polygons_to_mask,
    project_masks_on_boxes,
    project_masks_on_boxes_batch,
    project_polygons_on_boxes,
)
from maskrcnn.ops.matcher import Matcher
from maskrcnn.ops.nms import batched_nms, batched_nms_limited, nms
from maskrcnn.ops.pil_resize import pil_bilinear_resize
from maskrcnn.ops.poolers import LevelMapper, MultiLevelRoIAlign, multi_level_roi_align
from maskrcnn.ops.roi_align import RoIAlign, roi_align, shared_feature_tables
from maskrcnn.ops.roi_pool import RoIPool, roi_pool
from maskrcnn.ops.sampler import BalancedPositiveNegativeSampler
from maskrcnn.ops.winograd import (
    conv3x3_winograd,
    conv3x3_winograd_autograd,
    conv3x3_winograd_weight_grad,
    winograd_applies,
    winograd_tile,
    winograd_weight,
)

__all__ = [
    # argument errors (ValueError, and what torchvision raises: RuntimeError / AssertionError)
    "OpArgumentError",
    "RoIShapeError",
    # boxes
    "box_area",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_xywh",
    "boxes_to_rois",
    "clip_boxes_to_image",
    "flip_boxes",
    "remove_small_boxes",
    "BoxCoder",
    "box_voting",
    "BoxVoting",
    "BOX_VOTING_METHODS",
    # non-maximum suppression
    "nms",
    "batched_nms",
    "batched_nms_limited",
    # RoI feature extraction
    "roi_align",
    "shared_feature_tables",
    "RoIAlign",
    "roi_pool",
    "RoIPool",
    "LevelMapper",
    "MultiLevelRoIAlign",
    "multi_level_roi_align",
    # training targets and losses
    "Matcher",
    "BalancedPositiveNegativeSampler",
    "smooth_l1_loss",
    # masks
    "MASK_PASTE_METHODS",
    "paste_masks_by_method",
    "paste_masks_in_image",
    "paste_masks_grid_sample",
    "polygons_to_mask",
    "project_masks_on_boxes",
    "project_masks_on_boxes_batch",
    "project_polygons_on_boxes",
    # images
    "pil_bilinear_resize",
    # convolution
    "conv3x3_winograd",
    "conv3x3_winograd_autograd",
    "conv3x3_winograd_weight_grad",
    "winograd_applies",
    "winograd_tile",
    "winograd_weight",
    # backend selection
    "get_backend",
    "set_backend",
    "use_backend",
]
