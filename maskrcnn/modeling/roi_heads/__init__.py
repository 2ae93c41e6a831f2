"""RoI heads: ``Box_Head`` / ``Box_Outs`` (classification and box regression) and ``Mask_Head`` / ``Mask_Outs``."""
from .box_head import BOX_HEAD_REGISTRY, ResNetRoIConv5Head, Roi2MLPHead, RoiXconv1fcHead, build_box_head
from .box_outputs import FastRCNNOutputs
from .mask_head import MASK_HEAD_REGISTRY, MaskRCNNFCNHead, MaskRCNNHeadV0Up, MaskRCNNHeadV0UpShare, build_mask_head
from .mask_outputs import MaskRCNNOutputs
from .roi_heads import ROIHeads

__all__ = [
    "ROIHeads",
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
]
