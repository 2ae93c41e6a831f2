"""``build_model``: the model a config describes."""

from .generalized_rcnn import Generalized_RCNN


def build_model(cfg) -> Generalized_RCNN:
    """A fresh ``Generalized_RCNN(cfg)`` (randomly initialised, in training mode, on the CPU).

    Load weights with :func:`maskrcnn.load_ckpt`; ``cfg`` is a config from :func:`maskrcnn.get_cfg`.
    """
    return Generalized_RCNN(cfg)
