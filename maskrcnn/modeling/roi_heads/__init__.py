"""RoI heads: ``Box_Head`` / ``Box_Outs`` (classification and box regression), ``Mask_Head`` / ``Mask_Outs`` and
``Keypoint_Head`` / ``Keypoint_Outs``; ``ROIHeads`` holds them, ``CascadeROIHeads`` adds Cascade R-CNN's box stages."""
from .box_head import BOX_HEAD_REGISTRY, ResNetRoIConv5Head, Roi2MLPHead, RoiXconv1fcHead, build_box_head
from .box_outputs import FastRCNNOutputs
from .mask_head import MASK_HEAD_REGISTRY, MaskRCNNFCNHead, MaskRCNNHeadV0Up, MaskRCNNHeadV0UpShare, build_mask_head
from .keypoint_head import KEYPOINT_HEAD_REGISTRY, KeypointRCNNConvHead, build_keypoint_head
from .keypoint_outputs import KeypointRCNNOutputs, heatmaps_to_keypoints, keypoint_rcnn_loss, keypoints_to_heatmap
from .mask_outputs import MaskRCNNOutputs
from .roi_heads import ROIHeads
from .cascade import CascadeROIHeads, scale_gradient

__all__ = [
    "ROIHeads",
    "CascadeROIHeads",
    "scale_gradient",
    # Box_Head / Box_Outs
    "build_box_head",
    "BOX_HEAD_REGISTRY",
    "Roi2MLPHead",
    "ResNetRoIConv5Head",
    "RoiXconv1fcHead",
    "FastRCNNOutputs",
    # Mask_Head / Mask_Outs
    "build_mask_head",
    "MASK_HEAD_REGISTRY",
    "MaskRCNNFCNHead",
    "MaskRCNNHeadV0Up",
    "MaskRCNNHeadV0UpShare",
    "MaskRCNNOutputs",
    # Keypoint_Head / Keypoint_Outs
    "build_keypoint_head",
    "KEYPOINT_HEAD_REGISTRY",
    "KeypointRCNNConvHead",
    "KeypointRCNNOutputs",
    "keypoints_to_heatmap",
    "keypoint_rcnn_loss",
    "heatmaps_to_keypoints",
]
