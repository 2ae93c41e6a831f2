"""maskrcnn: Mask R-CNN in the Detectron tradition on PyTorch. ``Predictor`` is the front door for inference."""
from .predictor import Predictor

__all__ = ["Predictor"]
