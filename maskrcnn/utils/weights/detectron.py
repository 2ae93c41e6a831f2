"""Detectron (Caffe2) weight files: model-zoo ``.pkl`` detection models and the ImageNet ``R-50.pkl``-style backbones.

Layout (from Detectron's ``utils/net.py``): a pickled dict ``{'blobs': {name: ndarray}, 'cfg': yaml}`` (older files
and the ImageNet models hold the blob dict at the top level); ``*_momentum`` blobs are SGD state. Blob names
(``detectron/modeling/{ResNet,FPN,rpn_heads,fast_rcnn_heads,mask_rcnn_heads}.py``)::

    conv1_w  res_conv1_bn_{s,b}                      stem (GN models: conv1_gn_{s,b})
    res{s}_{b}_branch2{a,b,c}_w  ..._bn_{s,b}         bottleneck convs and their AffineChannel
    res{s}_{b}_branch1_w  res{s}_{b}_branch1_bn_{s,b} projection shortcut (first block of a stage)
    fpn_inner_res5_2_sum_{w,b}                        FPN 1x1 on the coarsest stage (no "_lateral")
    fpn_inner_res{s}_{last}_sum_lateral_{w,b}         FPN lateral 1x1s; {last} = last block index of stage s
    fpn_res{s}_{last}_sum_{w,b}                       FPN output 3x3s
    conv_rpn_fpn2_{w,b}  rpn_cls_logits_fpn2_{w,b}  rpn_bbox_pred_fpn2_{w,b}   FPN RPN (shared, level-2 names)
    conv_rpn_{w,b}  rpn_cls_logits_{w,b}  rpn_bbox_pred_{w,b}                  single-level (C4) RPN
    fc6_{w,b} fc7_{w,b}  cls_score_{w,b}  bbox_pred_{w,b}                      box head / outputs (bg = class 0)
    res5_*                                            C4 box head (ResNet_roi_conv5_head)
    _[mask]_fcn{1..4}_{w,b}  conv5_mask_{w,b}  mask_fcn_logits_{w,b}           mask head / outputs
    _[mask]_res5_*                                    v0up mask head's own res5 (v0upshare shares res5_*)

Caffe2 tensors have PyTorch's layouts (conv ``(out, in, kh, kw)``, FC ``(out, in)``, transposed conv
``(in, out, kh, kw)``), so blobs map one to one. Detectron models take BGR 0..255 images minus
``[102.9801, 115.9465, 122.7717]`` and use the "+1" box convention.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import yaml
from torch import Tensor

from .formats import WeightsConversionError, affine_to_bn, raise_unmapped, to_tensor

__all__ = ["is_detectron_blobs", "get_blobs", "detectron_to_canonical", "canonical_to_detectron",
           "read_detectron_cfg"]

_SUFFIX = {"w": "weight", "b": "bias"}
_BRANCH = {"2a": "1", "2b": "2", "2c": "3"}
_RES_RE = re.compile(r"^(_\[mask\]_)?res([2-5])_(\d+)_branch(1|2a|2b|2c)_(w|b|bn_s|bn_b|gn_s|gn_b)$")
_FPN_INNER_RE = re.compile(r"^fpn_inner_res([2-5])_(\d+)_sum(_lateral)?_(w|b|gn_s|gn_b)$")
_FPN_OUT_RE = re.compile(r"^fpn_res([2-5])_(\d+)_sum_(w|b|gn_s|gn_b)$")
_RPN_RE = re.compile(r"^(conv_rpn|rpn_cls_logits|rpn_bbox_pred)(?:_fpn(\d))?_(w|b)$")
_RPN_CANON = {"conv_rpn": "rpn.conv", "rpn_cls_logits": "rpn.cls_logits", "rpn_bbox_pred": "rpn.bbox_pred"}
_SIMPLE = {"fc6": "box.fc6", "fc7": "box.fc7", "cls_score": "box.cls_score", "bbox_pred": "box.bbox_pred",
           "conv5_mask": "mask.conv5_mask", "mask_fcn_logits": "mask.logits"}
_MASK_FCN_RE = re.compile(r"^_\[mask\]_fcn(\d+)_(w|b)$")
# Blobs Detectron itself never loads into a detection model: conv biases of bias-free convs, ImageNet classifiers.
# SpatialBN running statistics (``*_bn_rm``/``*_bn_riv``) are not AffineChannel parameters: Detectron ignores them too.
_IGNORED_RE = re.compile(r"^(conv1_b|res\d_\d+_branch(1|2a|2b|2c)_b|pred_[wb]|fc1000_[wb]|_\[mask\]_res\d_\d+_branch"
                         r"(1|2a|2b|2c)_b|.*_bn_(rm|riv))$")
_NON_BLOB_KEYS = ("cfg", "lr", "iter", "model_iter")


def get_blobs(obj: Any) -> Mapping[str, Any]:
    """The ``{name: ndarray}`` blob dict of a loaded Detectron file (``obj['blobs']`` or ``obj`` itself)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("blobs"), Mapping):
        return obj["blobs"]
    if isinstance(obj, Mapping):
        return obj
    raise WeightsConversionError(f"a Detectron weight file holds a dict, got {type(obj).__name__}")


def is_detectron_blobs(obj: Any) -> bool:
    """True for a loaded Detectron/Caffe2 file: numpy blobs with Caffe2 names such as ``conv1_w``."""
    try:
        blobs = get_blobs(obj)
    except WeightsConversionError:
        return False
    names = [k for k, v in blobs.items() if isinstance(k, str) and isinstance(v, np.ndarray)]
    return "conv1_w" in names or any(_RES_RE.match(n) or _RPN_RE.match(n) for n in names[:50])


def _norm(canonical: Dict[str, Tensor], prefix: str, kind: str, s: Optional[Tensor], b: Optional[Tensor],
          src: str) -> None:
    if s is None or b is None:
        raise WeightsConversionError(f"Detectron norm {src!r} needs both its _s and _b blobs")
    if kind == "bn":
        for k, v in affine_to_bn(s, b).items():
            canonical[f"{prefix}.{k}"] = v
    else:
        canonical[f"{prefix}.weight"], canonical[f"{prefix}.bias"] = s, b


def detectron_to_canonical(obj: Any) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a loaded Detectron file to canonical names (see :mod:`maskrcnn.utils.weights.formats`).

    Returns ``(canonical, notes)``. Momentum, conv biases of bias-free convs and ImageNet classifier blobs
    (``pred_*``, ``fc1000_*``) are dropped and counted in the notes; any other unknown blob is an error.
    """
    blobs = get_blobs(obj)
    canonical: Dict[str, Tensor] = OrderedDict()
    norms: Dict[Tuple[str, str], Dict[str, Tensor]] = OrderedDict()
    ignored, unmapped, rpn_levels = [], [], set()
    for name, value in blobs.items():
        if not isinstance(name, str):
            unmapped.append(repr(name))
            continue
        if name.endswith("_momentum") or name in _NON_BLOB_KEYS or _IGNORED_RE.match(name):
            ignored.append(name)
            continue
        if not isinstance(value, np.ndarray):
            ignored.append(name)
            continue
        t = to_tensor(value, name)
        m = _RES_RE.match(name)
        if m:
            mask, stage, block, branch, what = m.groups()
            prefix = f"{'mask_res5' if mask else 'res' + stage}.{block}"
            if mask and stage != "5":
                unmapped.append(name)
                continue
            layer = "downsample" if branch == "1" else None
            if what == "w":
                key = f"{prefix}.downsample.0.weight" if layer else f"{prefix}.conv{_BRANCH[branch]}.weight"
                canonical[key] = t
            else:
                kind, sb = what.split("_")
                norm_prefix = f"{prefix}.downsample.1" if layer else f"{prefix}.bn{_BRANCH[branch]}"
                norms.setdefault((norm_prefix, kind), {})[sb] = t
            continue
        if name == "conv1_w":
            canonical["stem.conv1.weight"] = t
            continue
        if name in ("res_conv1_bn_s", "res_conv1_bn_b", "conv1_gn_s", "conv1_gn_b"):
            norms.setdefault(("stem.bn1", "bn" if "_bn_" in name else "gn"), {})[name[-1]] = t
            continue
        m = _FPN_INNER_RE.match(name) or _FPN_OUT_RE.match(name)
        if m:
            is_inner = name.startswith("fpn_inner_")
            level, what = m.group(1), m.groups()[-1]
            prefix = f"fpn.{'lateral' if is_inner else 'output'}{level}"
            if what in ("w", "b"):
                canonical[f"{prefix}.{_SUFFIX[what]}"] = t
            else:
                canonical[f"{prefix}.norm.{'weight' if what == 'gn_s' else 'bias'}"] = t
            continue
        m = _RPN_RE.match(name)
        if m:
            layer, level, what = m.groups()
            rpn_levels.add(level)
            canonical[f"{_RPN_CANON[layer]}.{_SUFFIX[what]}"] = t
            continue
        m = _MASK_FCN_RE.match(name)
        if m:
            canonical[f"mask.fcn{m.group(1)}.{_SUFFIX[m.group(2)]}"] = t
            continue
        base, _, what = name.rpartition("_")
        if base in _SIMPLE and what in _SUFFIX:
            canonical[f"{_SIMPLE[base]}.{_SUFFIX[what]}"] = t
            continue
        unmapped.append(name)
    raise_unmapped("Detectron", unmapped, "Keypoint, RetinaNet, GroupNorm-head and other non-Mask R-CNN models are "
                   "not supported.")
    if len(rpn_levels) > 1:
        raise WeightsConversionError(f"Detectron RPN blobs for several levels {sorted(rpn_levels, key=str)}: the FPN "
                                     "RPN is shared and stored once under its lowest level")
    for (prefix, kind), sb in norms.items():
        _norm(canonical, prefix, kind, sb.get("s"), sb.get("b"), prefix)
    notes = []
    if ignored:
        notes.append(f"Detectron: dropped {len(ignored)} blob(s) Detectron does not load into the network "
                     f"(momentum, conv biases of bias-free convs, ImageNet classifier, metadata).")
    saved_cfg = read_detectron_cfg(obj.get("cfg") if isinstance(obj, Mapping) else None)
    if saved_cfg:
        notes.extend(_saved_cfg_notes(saved_cfg))
    return canonical, notes


# --- the yaml config saved with Detectron models ----------------------------------------------------------------
class _PlainLoader(yaml.SafeLoader):
    """A SafeLoader that reads Detectron's ``yaml.dump(AttrDict)`` output (python/object tags) as plain mappings
    and sequences; it never imports or constructs the tagged classes."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        data = loader.construct_mapping(node, deep=True)
        # !!python/object/new:AttrDict stores its items under "dictitems" and attributes under "state".
        if "dictitems" in data and isinstance(data["dictitems"], dict):
            return data["dictitems"]
        return data
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PlainLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def read_detectron_cfg(text: Any) -> Optional[Dict[str, Any]]:
    """The config saved in a Detectron ``.pkl`` (``blobs['cfg']``) as nested dicts, or None when absent or
    unreadable. Only YAML data is parsed; python tags are read as plain containers."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        return None
    try:
        data = yaml.load(text, Loader=_PlainLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _saved_cfg_notes(saved: Dict[str, Any]) -> List[str]:
    notes = []
    model = saved.get("MODEL") if isinstance(saved.get("MODEL"), dict) else {}
    parts = []
    for key in ("TYPE", "CONV_BODY", "NUM_CLASSES", "BBOX_REG_WEIGHTS"):
        if key in model:
            parts.append(f"MODEL.{key}={model[key]}")
    for sec, key in (("PIXEL_MEANS", None), ("RESNETS", "STRIDE_1X1"), ("FAST_RCNN", "ROI_BOX_HEAD"),
                     ("MRCNN", "ROI_MASK_HEAD"), ("MRCNN", "RESOLUTION")):
        if key is None and sec in saved:
            parts.append(f"{sec}={saved[sec]}")
        elif isinstance(saved.get(sec), dict) and key in saved[sec]:
            parts.append(f"{sec}.{key}={saved[sec][key]}")
    if parts:
        notes.append("Detectron config saved in the file: " + ", ".join(parts) + ".")
    if model and "BBOX_REG_WEIGHTS" not in model:
        notes.append("WARNING: this Detectron model predates MODEL.BBOX_REG_WEIGHTS; Detectron runs it with "
                     "MODEL.BBOX_REG_WEIGHTS (1.0, 1.0, 1.0, 1.0).")
    return notes


# --- canonical -> Detectron (writes files Detectron can load; also used by the tests) ----------------------------
def canonical_to_detectron(canonical: Mapping[str, Tensor]) -> Dict[str, np.ndarray]:
    """Inverse of :func:`detectron_to_canonical` (batch norms must be affine: mean 0; their ``var`` is folded into
    the scale). FPN blob names use the last block index of each stage, found from the ``res*`` keys."""
    last_block: Dict[str, int] = {}
    for k in canonical:
        m = re.match(r"^res([2-5])\.(\d+)\.", k)
        if m:
            last_block[m.group(1)] = max(last_block.get(m.group(1), 0), int(m.group(2)))
    top = max(last_block) if last_block else "5"
    out: Dict[str, np.ndarray] = OrderedDict()

    def arr(t: Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    done = set()
    for key, t in canonical.items():
        if key in done:
            continue
        m = re.match(r"^(stem|res[2-5]\.\d+|mask_res5\.\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$", key)
        if m:
            prefix, layer, what = m.groups()
            if prefix == "stem":
                base = "conv1" if layer == "conv1" else "res_conv1_bn"
            else:
                stage_block = prefix.replace(".", "_").replace("mask_res5", "_[mask]_res5")
                branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
                          "downsample.0": "1", "downsample.1": "1"}[layer]
                base = f"{stage_block}_branch{branch}"
                if layer.startswith("bn") or layer == "downsample.1":
                    base += "_bn"
            if layer.startswith("conv") or layer == "downsample.0":
                out[f"{base}_w"] = arr(t)
            else:
                head = key.rsplit(".", 1)[0]
                w, b = canonical[f"{head}.weight"], canonical[f"{head}.bias"]
                mean = canonical.get(f"{head}.running_mean")
                var = canonical.get(f"{head}.running_var")
                if mean is not None and var is not None:
                    scale = w / (var + 1e-5).sqrt()
                    b = b - mean * scale
                    w = scale
                out[f"{base}_s"], out[f"{base}_b"] = arr(w), arr(b)
                done.update(f"{head}.{k}" for k in ("weight", "bias", "running_mean", "running_var"))
            continue
        m = re.match(r"^fpn\.(lateral|output)([2-5])\.(weight|bias)$", key)
        if m:
            kind, level, what = m.groups()
            stage_name = f"res{level}_{last_block.get(level, 0)}_sum"
            if kind == "output":
                base = f"fpn_{stage_name}"
            else:
                base = f"fpn_inner_{stage_name}" + ("" if level == top else "_lateral")
            out[f"{base}_{what[0]}"] = arr(t)
            continue
        m = re.match(r"^(rpn\.conv|rpn\.cls_logits|rpn\.bbox_pred)\.(weight|bias)$", key)
        if m:
            names = {"rpn.conv": "conv_rpn", "rpn.cls_logits": "rpn_cls_logits", "rpn.bbox_pred": "rpn_bbox_pred"}
            fpn = "_fpn2" if any(k.startswith("fpn.") for k in canonical) else ""
            out[f"{names[m.group(1)]}{fpn}_{m.group(2)[0]}"] = arr(t)
            continue
        m = re.match(r"^mask\.fcn(\d+)\.(weight|bias)$", key)
        if m:
            out[f"_[mask]_fcn{m.group(1)}_{m.group(2)[0]}"] = arr(t)
            continue
        head, _, what = key.rpartition(".")
        inverse = {v: k for k, v in _SIMPLE.items()}
        if head in inverse:
            out[f"{inverse[head]}_{what[0]}"] = arr(t)
            continue
        raise WeightsConversionError(f"canonical tensor {key!r} has no Detectron name")
    return out
