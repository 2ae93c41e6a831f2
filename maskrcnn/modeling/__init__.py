"""The Detectron modules: ``Generalized_RCNN`` = preprocess -> ``Conv_Body`` -> ``RPN`` -> box and mask heads.

Each piece has an explicit typed constructor and a ``from_cfg`` (or ``build_*(cfg)``) that maps the config.
"""
from .backbone import FPN, FPNConvBody, ResNet, ResNetConvBody, build_conv_body
from .build import build_model
from .generalized_rcnn import Generalized_RCNN
from .preprocess import ImageList, Preprocessor
from .roi_heads import (
    KeypointRCNNConvHead,
    KeypointRCNNOutputs,
    FastRCNNOutputs,
    MaskRCNNFCNHead,
    MaskRCNNHeadV0Up,
    MaskRCNNHeadV0UpShare,
    MaskRCNNOutputs,
    ResNetRoIConv5Head,
    CascadeROIHeads,
    ROIHeads,
    Roi2MLPHead,
    build_box_head,
    build_mask_head,
)
from .rpn import RPN, AnchorGenerator, RPNHead

__all__ = [
    "Generalized_RCNN",
    "build_model",
    # preprocessing
    "ImageList",
    "Preprocessor",
    # Conv_Body
    "build_conv_body",
    "ResNetConvBody",
    "FPNConvBody",
    "ResNet",
    "FPN",
    # RPN
    "RPN",
    "RPNHead",
    "AnchorGenerator",
    # RoI heads: Box_Head / Box_Outs
    "ROIHeads",
    "CascadeROIHeads",
    "build_box_head",
    "Roi2MLPHead",
    "ResNetRoIConv5Head",
    "FastRCNNOutputs",
    # Mask_Head / Mask_Outs
    "build_mask_head",
    "MaskRCNNFCNHead",
    "MaskRCNNHeadV0Up",
    "MaskRCNNHeadV0UpShare",
    "MaskRCNNOutputs",
    # Keypoint_Head / Keypoint_Outs
    "KeypointRCNNConvHead",
    "KeypointRCNNOutputs",
]
