"""Checkpoints and weight loading, environment, logging and distributed helpers.

Drawing (:mod:`maskrcnn.utils.vis`) is not imported here: it needs OpenCV and pycocotools, and every
checkpoint load goes through this package. Converters between weight formats are in
:mod:`maskrcnn.utils.weights`; distributed helpers in :mod:`maskrcnn.utils.distributed`.
"""
from .checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    Checkpointer,
    load_checkpoint,
    load_ckpt,
    save_checkpoint,
)
from .denormal import flush_denormal
from .env import collect_env_info, resolve_device, seed_all
from .logger import SmoothedValue, setup_logger
from .malloc import tune_malloc
from .model import model_device

__all__ = [
    "load_ckpt",
    "Checkpointer",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "seed_all",
    "resolve_device",
    "collect_env_info",
    "setup_logger",
    "SmoothedValue",
    "tune_malloc",
    "flush_denormal",
    "model_device",
]
