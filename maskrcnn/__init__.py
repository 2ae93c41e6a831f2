"""maskrcnn: Mask R-CNN on PyTorch in the Detectron tradition.

The names a user reaches for first::

    from maskrcnn import get_cfg, build_model, load_ckpt, Predictor

    cfg = get_cfg()                      # every key documented in docs/config.md
    model = build_model(cfg)             # a Generalized_RCNN
    load_ckpt(model, "model_final.pth")  # ours, Detectron, detectron2 or torchvision weights
    predictor = Predictor("configs/...yaml", "model_final.pth")   # the front door for inference, fast by default

They are loaded on first access, so ``import maskrcnn`` (and any ``import maskrcnn.<subpackage>``, which
runs this file first) imports neither torch nor the model; subpackages never depend on this file.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any
from typing import List as _List

from maskrcnn.version import __version__

# Public name -> module that defines it.
_EXPORTS = {
    "get_cfg": "maskrcnn.config",
    "Generalized_RCNN": "maskrcnn.modeling",
    "build_model": "maskrcnn.modeling",
    "load_ckpt": "maskrcnn.utils.checkpoint",
    "Predictor": "maskrcnn.predictor",
}

__all__ = ["__version__", *_EXPORTS]

if _TYPE_CHECKING:  # for static analysis; at run time the names load lazily through __getattr__
    from maskrcnn.config import get_cfg
    from maskrcnn.modeling import Generalized_RCNN, build_model
    from maskrcnn.predictor import Predictor
    from maskrcnn.utils.checkpoint import load_ckpt


def __getattr__(name: str) -> _Any:
    module = _EXPORTS.get(name)
    if module is None:
        # AttributeError (not ImportError) lets `from maskrcnn import config` fall back to the submodule.
        raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> _List[str]:
    # The public names (loaded or not) and the subpackages imported so far; not this file's helpers.
    return sorted(n for n in set(globals()) | set(__all__) if not n.startswith("_") or n.startswith("__"))
