"""Weights from other projects (Detectron, Detectron.pytorch, detectron2, torchvision) mapped to this model.

Every format is first mapped to one canonical naming, then to ours; files are read with restricted
unpicklers only (no arbitrary code runs when loading a weights file).
"""
from .formats import FORMATS, WeightsConversionError, convert_file, convert_to_ours, detect_format
from .imagenet import load_imagenet_pretrained_weights
from .safe_pickle import UnsafeWeightsError, WeightsFileError, load_weights_file

__all__ = [
    "FORMATS",
    "detect_format",
    "convert_to_ours",
    "convert_file",
    "load_weights_file",
    "load_imagenet_pretrained_weights",
    "WeightsConversionError",
    "WeightsFileError",
    "UnsafeWeightsError",
]
