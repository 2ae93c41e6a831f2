"""Conversion of any supported weight file into our state dict: format detection and the dispatch to the converters.

Imports go one way: :mod:`.common` (the canonical layout, tensor helpers) and :mod:`.rules` (the renaming engine)
<- one converter per zoo (:mod:`.detectron`, :mod:`.detectron_pytorch`, :mod:`.torchvision`, :mod:`.detectron2`;
each a table of renaming rules plus its special steps, all producing canonical tensors) <- this module, which
detects the format, runs the converter, flips conv1's channels when the config's pixel order asks for it, places the
canonical tensors in our model (:mod:`.ours`) and adds config notes (:mod:`.hints`). The names re-exported here
(``to_tensor``, ``OUR_NAMES``, ``canonical_to_ours``, ``cfg_hint_notes``, ...) keep their historical import path.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .common import (CANONICAL_BN_EPS, WeightsConversionError, affine_to_bn, flip_conv1_channels, to_tensor,
                     unwrap_state_dict)
from .detectron import detectron_to_canonical, is_detectron_blobs
from .detectron2 import detectron2_to_canonical, is_detectron2
from .detectron_pytorch import detectron_pytorch_to_canonical, is_detectron_pytorch
from .hints import FORMAT_CFG_HINTS, cfg_hint_notes, describe_canonical
from .ours import MASK_HEADS_WITH_RES5_COPY, OUR_NAMES, canonical_to_ours, layout_from_cfg, ours_to_canonical
from .safe_pickle import load_weights_file
from .torchvision import is_torchvision, torchvision_to_canonical

__all__ = [
    "FORMATS", "CANONICAL_BN_EPS", "OUR_NAMES", "FORMAT_CFG_HINTS", "MASK_HEADS_WITH_RES5_COPY",
    "WeightsConversionError", "detect_format", "convert_to_ours", "convert_file", "canonical_to_ours",
    "ours_to_canonical", "flip_conv1_channels", "to_tensor", "affine_to_bn", "cfg_hint_notes", "describe_canonical",
    "load_as_ours", "is_ours",
]

#: The source formats :func:`convert_to_ours` understands (plus ``"ours"``, which passes through).
FORMATS = ("detectron", "detectron.pytorch", "torchvision", "detectron2")

_OUR_TOP = ("Conv_Body.", "RPN.", "Box_Head.", "Box_Outs.", "Mask_Head.", "Mask_Outs.")


def is_ours(obj: Any) -> bool:
    """True for a checkpoint of ours (``{'model': state_dict, ...}``) or a bare state dict of ours: every key under
    one of our top-level modules, and not Detectron.pytorch's names (which share the top-level ones)."""
    if not isinstance(obj, Mapping):
        return False
    sd = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    keys = list(sd)
    if not keys or not all(isinstance(k, str) for k in keys):
        return False
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    return all(k.startswith(_OUR_TOP) for k in keys) and not is_detectron_pytorch(sd)


def detect_format(obj: Any, path: Optional[str] = None) -> str:
    """The format of a loaded weight file: ``"ours"``, ``"detectron"``, ``"detectron.pytorch"``, ``"torchvision"``
    or ``"detectron2"`` (ImageNet backbones are ``"detectron"`` (Caffe2 ``R-50.pkl``) or ``"torchvision"``).

    ``path`` only improves the error message. Raises :class:`WeightsConversionError` when nothing matches.
    """
    if is_ours(obj):
        return "ours"
    for fmt, test in (("detectron2", is_detectron2), ("torchvision", is_torchvision),
                      ("detectron.pytorch", is_detectron_pytorch), ("detectron", is_detectron_blobs)):
        if test(obj):
            return fmt
    where = f" {os.fspath(path)!r}" if path is not None else ""
    if isinstance(obj, Mapping):
        keys = list(obj.keys())[:8]
        inner = obj.get("model") if isinstance(obj.get("model"), Mapping) else None
        if inner is not None:
            keys = ["model: " + ", ".join(map(str, list(inner.keys())[:8]))]
        what = f"a dict with keys {keys}"
    else:
        what = f"a {type(obj).__name__}"
    raise WeightsConversionError(f"cannot tell the format of weight file{where}: it holds {what}. Supported: "
                                 f"{', '.join(FORMATS)} and maskrcnn's own checkpoints.")


def _to_canonical(obj: Any, fmt: str, cfg) -> Tuple[Dict[str, Tensor], List[str]]:
    if fmt == "detectron":
        return detectron_to_canonical(obj)
    if fmt == "detectron.pytorch":
        shares = None
        if cfg is not None and layout_from_cfg(cfg) == "c4" and cfg.MODEL.MASK_ON:
            shares = str(cfg.MRCNN.ROI_MASK_HEAD).endswith("v0upshare")
        return detectron_pytorch_to_canonical(obj, mask_head_shares_res5=shares)
    if fmt == "torchvision":
        return torchvision_to_canonical(obj)
    if fmt == "detectron2":
        grid = None
        if cfg is not None and not cfg.FPN.FPN_ON and "fpn" not in str(cfg.MODEL.CONV_BODY).lower():
            grid = (len(cfg.RPN.SIZES), len(cfg.RPN.ASPECT_RATIOS))
        return detectron2_to_canonical(obj, anchor_grid=grid)
    raise WeightsConversionError(f"fmt={fmt!r} is not a supported weight format; use one of {FORMATS}")


#: Channel order each format's first convolution expects; None: the file does not say (detectron2 trains with its
#: INPUT.FORMAT, BGR for the MSRA-initialised zoo models, RGB for torchvision-initialised ones, and stores no trace
#: of it), so conv1 is never flipped automatically and the config's PIXEL_ORDER must state it.
_PIXEL_ORDER = {"detectron": "BGR", "detectron.pytorch": "BGR", "torchvision": "RGB", "detectron2": None}


def convert_to_ours(obj: Any, fmt: Optional[str] = None, cfg=None, *, model=None,
                    flip_input_channels: Optional[bool] = None, path: Optional[str] = None
                    ) -> Tuple["OrderedDict[str, Tensor]", List[str]]:
    """Turn a loaded weight file into a state dict for ``Generalized_RCNN``.

    Args:
        obj: the loaded file (:func:`maskrcnn.utils.weights.safe_pickle.load_weights_file`).
        fmt: one of :data:`FORMATS` or ``"ours"``; None detects it (:func:`detect_format`).
        cfg: the target model's config: places res5 for C4/conv5/FPN bodies, picks the C4 mask head, gives the
            single-level anchor grid, and decides the conv1 channel flip (its ``PIXEL_ORDER`` against the format's).
        model: the target model (or its ``state_dict()``); settles what the config cannot (BatchNorm counters,
            the C4 mask head's res5 copy, class-agnostic layers).
        flip_input_channels: reverse conv1's input channels (BGR <-> RGB); None flips exactly when ``cfg`` is given
            and its ``PIXEL_ORDER`` differs from the format's. detectron2 files do not record their channel order:
            None never flips them (a note says that ``PIXEL_ORDER`` must be the order the model was trained with).
        path: the file's path, for messages.
    Returns:
        ``(state_dict, notes)``: float32 CPU tensors under our names, and human-readable notes (what was dropped or
        reordered, which config values the weights expect, and config mismatches). Class-specific layers are kept
        whatever their class count; fitting them to another count is the loader's business.
    """
    if fmt is None:
        fmt = detect_format(obj, path)
    elif fmt in FORMATS:
        try:
            seen = detect_format(obj, path)
        except WeightsConversionError:
            seen = fmt  # unrecognised layout: let the requested format's mapping report what does not fit
        if seen != fmt:
            raise WeightsConversionError(f"weights {path or ''} were given as {fmt!r} but look like a {seen!r} file")
    if fmt == "ours":
        return OrderedDict((k, to_tensor(v, k)) for k, v in unwrap_state_dict(obj, ("model",)).items()), []
    if fmt not in FORMATS:
        raise WeightsConversionError(f"fmt={fmt!r} is not a supported weight format; use one of {FORMATS}")
    canonical, notes = _to_canonical(obj, fmt, cfg)
    if not canonical:
        raise WeightsConversionError(f"the {fmt} file {path or ''} holds no weights")
    flip = flip_input_channels
    order = _PIXEL_ORDER[fmt]
    if flip is None:
        flip = cfg is not None and order is not None and str(cfg.PIXEL_ORDER).upper() != order
    if flip:
        flip_conv1_channels(canonical)
        notes.append("conv1 input channels flipped (" + (f"{order} -> {'RGB' if order == 'BGR' else 'BGR'}"
                                                          if order else "as asked") + ").")
    elif order is None:
        have = f" = {cfg.PIXEL_ORDER}" if cfg is not None else ""
        notes.append(f"{fmt} files do not record the channel order their conv1 expects (detectron2's INPUT.FORMAT: "
                     "BGR for its MSRA-initialised zoo models, RGB for torchvision-initialised ones); conv1 is used "
                     f"as is, so PIXEL_ORDER{have} must be the order the model was trained with.")
    has_heads = any(k.startswith(("rpn.", "box.", "mask.", "kps.")) for k in canonical)
    if not has_heads:
        notes.append(f"{fmt}: backbone weights only (ImageNet initialisation); the FPN, RPN and RoI heads keep "
                     "their initialisation.")
    target = None
    if model is not None:
        target = unwrap_state_dict(model.state_dict() if hasattr(model, "state_dict") else model, ())
    sd, more = canonical_to_ours(canonical, cfg=cfg, target=target)
    notes.extend(more)
    notes.extend(cfg_hint_notes(fmt, cfg, flipped=bool(flip), info=describe_canonical(canonical)))
    return sd, notes


def load_as_ours(path: str, cfg=None, *, model=None, fmt: Optional[str] = None,
                 flip_input_channels: Optional[bool] = None) -> Tuple["OrderedDict[str, Tensor]", List[str], str]:
    """Safely load any supported weight file and convert it: ``(state_dict, notes, detected_format)``."""
    obj = load_weights_file(path)
    fmt = fmt or detect_format(obj, path)
    sd, notes = convert_to_ours(obj, fmt, cfg, model=model, flip_input_channels=flip_input_channels, path=path)
    return sd, notes, fmt


def convert_file(input_path: str, output_path: str, fmt: Optional[str] = None, cfg=None, *,
                 flip_input_channels: Optional[bool] = None) -> List[str]:
    """Convert ``input_path`` and write our checkpoint format to ``output_path``:
    ``{"model": state_dict, "cfg": cfg.dump() or None, "source": {"format", "file", "notes"}}`` (loadable with
    ``torch.load(..., weights_only=True)``). Returns the notes."""
    sd, notes, fmt = load_as_ours(input_path, cfg, fmt=fmt, flip_input_channels=flip_input_channels)
    ckpt = {"model": sd, "cfg": cfg.dump() if cfg is not None else None,
            "source": {"format": fmt, "file": os.path.basename(os.fspath(input_path)), "notes": list(notes)}}
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(ckpt, output_path)
    return notes
