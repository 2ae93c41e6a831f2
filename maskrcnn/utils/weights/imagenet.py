"""ImageNet backbone initialisation (``MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS`` with ``RESNETS.IMAGENET_*``).

Accepted files: Detectron's Caffe2 classification models (``R-50.pkl``, ``R-101.pkl``, ``X-101-32x8d.pkl``, ...:
a flat ``{blob name: ndarray}`` dict with classifier blobs ``pred_*`` / ``fc1000_*``) and torchvision's
``resnet*`` / ``resnext*`` state dicts (``conv1``, ``bn1``, ``layer1..4``, ``fc``). The classifier is dropped; the stem
and ``res2``..``res5`` go to the body, except that a C4 model's ``res5`` lives in its box head (``Box_Head.res5``),
where Detectron initialises it from the same ImageNet ``res5`` blobs. The FPN, RPN and RoI heads keep their own
initialisation. A depth or width that does not match the model is an error listing the offending tensors.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from torch import nn

from .formats import WeightsConversionError, convert_to_ours, detect_format
from .safe_pickle import load_weights_file

__all__ = ["imagenet_backbone_state_dict", "load_imagenet_pretrained_weights"]

_BACKBONE_RE = re.compile(r"^(stem|res[2-5]|mask_res5)\.")


def imagenet_backbone_state_dict(path: str, cfg=None, model: Optional[nn.Module] = None):
    """``(state_dict, notes)`` with our names for the backbone tensors of the ImageNet file at ``path``.

    ``cfg`` (or ``model.cfg``) places res5 and decides the conv1 channel flip: Caffe2 files are BGR, torchvision's
    RGB; the flip makes them match ``cfg.PIXEL_ORDER``."""
    path = os.fspath(path)
    if cfg is None and model is not None:
        cfg = getattr(model, "cfg", None)
    obj = load_weights_file(path)
    fmt = detect_format(obj, path)
    if fmt not in ("detectron", "torchvision"):
        raise WeightsConversionError(
            f"{path!r} is a {fmt} file; ImageNet initialisation takes a Caffe2 classification .pkl (R-50.pkl, "
            "X-101-32x8d.pkl, ...) or a torchvision resnet*/resnext* state dict")
    sd, notes = convert_to_ours(obj, fmt, cfg, model=model, path=path)
    heads = [k for k in sd if not _is_backbone_key(k)]
    if heads:
        raise WeightsConversionError(
            f"{path!r} is a detection model (it has {', '.join(heads[:5])}{', ...' if len(heads) > 5 else ''}), "
            "not an ImageNet backbone; load it with load_ckpt instead")
    return sd, notes


def _is_backbone_key(key: str) -> bool:
    return key.startswith("Conv_Body.") and ".fpn." not in key or key.startswith(("Box_Head.res5.", "Mask_Head.res5."))


def load_imagenet_pretrained_weights(model: nn.Module, path: str, cfg=None) -> List[str]:
    """Copy the ImageNet backbone at ``path`` into ``model`` (a ``Generalized_RCNN`` or anything with its names).

    Every converted tensor must land on a model tensor of the same shape, and every backbone tensor of the model
    (stem and ResNet stages, including a C4 box head's res5) must be covered; otherwise
    :class:`WeightsConversionError` lists the missing, unexpected and mismatched names. Returns notes (what was
    loaded, the config values the weights expect)."""
    sd, notes = imagenet_backbone_state_dict(path, cfg=cfg, model=model)
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in sd if k in own and sd[k].shape != own[k].shape)
    wanted = [k for k in own if _is_backbone_key(k) and not k.endswith("num_batches_tracked")]
    missing = sorted(k for k in wanted if k not in sd)
    if unexpected or mismatched or missing:
        parts = []
        for title, items in (("missing in the file", missing), ("not in the model", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:10]) + (", ..." if len(items) > 10 else ""))
        raise WeightsConversionError(f"ImageNet weights {os.fspath(path)!r} do not fit the model's backbone (check "
                                     f"MODEL.CONV_BODY and RESNETS.NUM_GROUPS/WIDTH_PER_GROUP): " + "; ".join(parts))
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    notes.insert(0, f"ImageNet initialisation: {len(sd)} backbone tensors loaded from {os.fspath(path)!r}.")
    return notes
