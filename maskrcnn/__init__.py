"""maskrcnn: Mask R-CNN in the Detectron tradition on PyTorch. ``Predictor`` is the front door for inference.

Names are imported on first use (PEP 562), so ``import maskrcnn`` (and ``maskrcnn.cli``) does not import torch:
the command-line entry points set up the environment before torch loads.
"""
import importlib
from typing import Any

__all__ = ["Predictor"]

_LAZY = {"Predictor": "maskrcnn.predictor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
