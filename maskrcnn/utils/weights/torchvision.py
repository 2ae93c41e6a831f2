"""torchvision weights: ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` (v1) detection state dicts and the
ImageNet ``resnet*`` / ``resnext*`` / ``wide_resnet*`` classification state dicts (backbone initialisation).

Names (``torchvision/models/detection/{mask_rcnn,faster_rcnn,rpn}.py``, ``ops/feature_pyramid_network.py``,
``models/resnet.py``)::

    backbone.body.conv1.weight  backbone.body.bn1.*            stem (ImageNet files: conv1.*, bn1.* without prefix)
    backbone.body.layer{1..4}.{b}.conv{1,2,3}.weight  .bn{1,2,3}.*  .downsample.{0,1}.*   = res2..res5
    backbone.fpn.inner_blocks.{i}.0.*  backbone.fpn.layer_blocks.{i}.0.*      i = 0..3 -> P2..P5 (finest first)
    rpn.head.conv.0.0.*  rpn.head.cls_logits.*  rpn.head.bbox_pred.*
    roi_heads.box_head.fc6.*  fc7.*   roi_heads.box_predictor.cls_score.*  bbox_pred.*      (class 0 = background)
    roi_heads.mask_head.{0..3}.0.*    roi_heads.mask_predictor.conv5_mask.*  mask_fcn_logits.*

Files saved before torchvision 0.13 use ``inner_blocks.{i}.*``, ``rpn.head.conv.*`` and ``mask_head.mask_fcn{k}.*``
(torchvision upgrades them in ``_load_from_state_dict``); both spellings are read. Norm layers are FrozenBN (four
buffers) or BatchNorm2d (plus ``num_batches_tracked``, dropped); torchvision's FrozenBN eps is 1e-5. ImageNet
classifiers (``fc.*``) are dropped. torchvision models take RGB in [0, 1] normalised by the ImageNet mean/std, and put
the block stride in the 3x3 conv.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from .formats import WeightsConversionError, raise_unmapped, to_tensor, unwrap_state_dict

__all__ = ["is_torchvision", "torchvision_to_canonical", "canonical_to_torchvision"]

_BODY_RE = re.compile(r"^(?:backbone\.body\.)?(conv1\.weight|bn1\.\w+|layer([1-4])\.(\d+)\.(conv[123]\.weight|"
                      r"bn[123]\.\w+|downsample\.[01]\.\w+))$")
_HEADS = {
    "rpn.head.conv.0.0": "rpn.conv", "rpn.head.conv": "rpn.conv",
    "rpn.head.cls_logits": "rpn.cls_logits", "rpn.head.bbox_pred": "rpn.bbox_pred",
    "roi_heads.box_head.fc6": "box.fc6", "roi_heads.box_head.fc7": "box.fc7",
    "roi_heads.box_predictor.cls_score": "box.cls_score", "roi_heads.box_predictor.bbox_pred": "box.bbox_pred",
    "roi_heads.mask_predictor.conv5_mask": "mask.conv5_mask",
    "roi_heads.mask_predictor.mask_fcn_logits": "mask.logits",
}
_FPN_RE = re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)(?:\.0)?\.(weight|bias)$")
_MASK_RE = re.compile(r"^roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.(weight|bias)$")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def is_torchvision(obj: Any) -> bool:
    """True for a torchvision detection state dict (``backbone.body.*``) or ImageNet ResNet (``layer1.0.*``)."""
    try:
        sd = unwrap_state_dict(obj)
    except WeightsConversionError:
        return False
    keys = [k for k in sd if isinstance(k, str)]
    return any(k.startswith("backbone.body.") for k in keys) or (
        "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys))


def torchvision_to_canonical(obj: Any) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a torchvision state dict (or a checkpoint dict holding it under ``model``/``state_dict``) to canonical
    names. Returns ``(canonical, notes)``; ``notes`` say what was dropped and whether it is a backbone-only file."""
    sd = unwrap_state_dict(obj)
    canonical: Dict[str, Tensor] = OrderedDict()
    unmapped: List[str] = []
    dropped_counters = dropped_fc = 0
    for name, value in sd.items():
        if name.endswith("num_batches_tracked"):
            dropped_counters += 1
            continue
        if name in ("fc.weight", "fc.bias"):
            dropped_fc += 1
            continue
        t = to_tensor(value, name)
        m = _BODY_RE.match(name)
        if m:
            inner, layer, block, rest = m.groups()
            if layer is None:
                canonical[f"stem.{inner}"] = t
            else:
                canonical[f"res{int(layer) + 1}.{block}.{rest}"] = t
            continue
        m = _FPN_RE.match(name)
        if m:
            kind, i, what = m.groups()
            canonical[f"fpn.{'lateral' if kind == 'inner_blocks' else 'output'}{int(i) + 2}.{what}"] = t
            continue
        m = _MASK_RE.match(name)
        if m:
            idx = int(m.group(1)) + 1 if m.group(1) is not None else int(m.group(2))
            canonical[f"mask.fcn{idx}.{m.group(3)}"] = t
            continue
        head, _, what = name.rpartition(".")
        if head in _HEADS and what in ("weight", "bias"):
            canonical[f"{_HEADS[head]}.{what}"] = t
            continue
        unmapped.append(name)
    raise_unmapped("torchvision", unmapped, "Only the v1 maskrcnn/fasterrcnn_resnet50_fpn models and ImageNet "
                   "ResNet/ResNeXt classifiers are supported (not the *_v2 models, whose heads differ).")
    _check_bn_complete(canonical)
    notes: List[str] = []
    if dropped_counters:
        notes.append(f"torchvision: dropped {dropped_counters} BatchNorm num_batches_tracked counter(s).")
    if dropped_fc:
        notes.append("torchvision: ImageNet classification file; the classifier (fc) was dropped, backbone only.")
    return canonical, notes


def _check_bn_complete(canonical: Mapping[str, Tensor]) -> None:
    heads = {k.rsplit(".", 1)[0] for k in canonical if re.search(r"\.(bn\d|downsample\.1)\.\w+$", k)}
    for head in heads:
        missing = [b for b in _BN_KEYS if f"{head}.{b}" not in canonical]
        if missing:
            raise WeightsConversionError(f"torchvision norm {head!r} lacks {missing}")


def canonical_to_torchvision(canonical: Mapping[str, Tensor], imagenet: bool = False) -> Dict[str, Tensor]:
    """Inverse of :func:`torchvision_to_canonical` with current torchvision names (FrozenBN keys)."""
    inverse = {v: k for k, v in _HEADS.items() if k != "rpn.head.conv"}
    body = "" if imagenet else "backbone.body."
    out: Dict[str, Tensor] = OrderedDict()
    for key, t in canonical.items():
        if key.startswith("stem."):
            out[body + key[len("stem."):]] = t
            continue
        m = re.match(r"^res([2-5])\.(\d+)\.(.+)$", key)
        if m:
            out[f"{body}layer{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"] = t
            continue
        m = re.match(r"^fpn\.(lateral|output)([2-5])\.(weight|bias)$", key)
        if m:
            kind = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
            out[f"backbone.fpn.{kind}.{int(m.group(2)) - 2}.0.{m.group(3)}"] = t
            continue
        m = re.match(r"^mask\.fcn(\d+)\.(weight|bias)$", key)
        if m:
            out[f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"] = t
            continue
        head, _, what = key.rpartition(".")
        if head in inverse:
            out[f"{inverse[head]}.{what}"] = t
            continue
        raise WeightsConversionError(f"canonical tensor {key!r} has no torchvision name")
    return out
