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
    head_conv{1..4}_w  head_conv{i}_gn_{s,b}  fc6_{w,b}      GN box head (roi_Xconv1fc_gn_head: ConvGN, no conv bias)
    _mask_fcn{1..4}_w  _mask_fcn{i}_gn_{s,b}                 GN mask head (mask_rcnn_fcn_head_v1upXconvs_gn names
                                                              its ConvGN blobs '_mask_fcn', without the brackets)
    ..._gn_{s,b}                                             GroupNorm scale/shift of a ConvGN blob (GN bodies and
                                                              FPN too: res2_0_branch2a_gn_s, fpn_inner_res5_2_sum_gn_s)
    _[mask]_res5_*                                    v0up mask head's own res5 (v0upshare shares res5_*)
    conv_fcn{1..8}_{w,b}  kps_score_lowres_{w,b}      keypoint head (roi_pose_head_v1convX) and its deconv output;
    kps_score_{w,b}                                   the fixed bilinear upsampling (not learnt; ours computes it)

Caffe2 tensors have PyTorch's layouts (conv ``(out, in, kh, kw)``, FC ``(out, in)``, transposed conv
``(in, out, kh, kw)``), so blobs map one to one. Detectron models take BGR 0..255 images minus
``[102.9801, 115.9465, 122.7717]`` and use the "+1" box convention.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import yaml
from torch import Tensor

from .common import WeightsConversionError, affine_channels_to_bn, bn_to_affine_channels, to_tensor
from .rules import Rule, RuleTable, inverse

__all__ = ["is_detectron_blobs", "get_blobs", "detectron_to_canonical", "canonical_to_detectron",
           "read_detectron_cfg"]

_WB = {"w": "weight", "b": "bias"}
_AFFINE = {"s": "scale", "b": "shift"}  # AffineChannel blobs
_GN = {"s": "weight", "b": "bias"}  # GroupNorm blobs
_CONV = {"2a": "conv1", "2b": "conv2", "2c": "conv3", "1": "downsample.0"}
_NORM = {"2a": "bn1", "2b": "bn2", "2c": "bn3", "1": "downsample.1"}
_STAGE = {**{f"res{s}": f"res{s}" for s in range(2, 6)}, "_[mask]_res5": "mask_res5"}
_RPN = {"conv_rpn": "conv", "rpn_cls_logits": "cls_logits", "rpn_bbox_pred": "bbox_pred"}
_HEADS = {"fc6": "box.fc6", "fc7": "box.fc7", "cls_score": "box.cls_score", "bbox_pred": "box.bbox_pred",
          "conv5_mask": "mask.conv5_mask", "mask_fcn_logits": "mask.logits"}
_BLOCK = r"(?P<stage>res[2-5]|_\[mask\]_res5)_(?P<b>\d+)_branch(?P<br>1|2a|2b|2c)"
_FPN_INNER = r"fpn_inner_res(?P<L>[2-5])_\d+_sum(?:_lateral)?"
_FPN_OUT = r"fpn_res(?P<L>[2-5])_\d+_sum"
_RPN_RE = re.compile(r"^(?:conv_rpn|rpn_cls_logits|rpn_bbox_pred)(?:_fpn(\d))?_[wb]$")

#: Detectron blob name -> canonical name.
TO_CANONICAL = RuleTable("this Detectron file", "maskrcnn's model", [
    # Blobs Detectron itself never loads into a detection model: SGD state, metadata, conv biases of bias-free
    # convs, ImageNet classifiers, and SpatialBN running statistics (not AffineChannel parameters).
    Rule(r".*_momentum|cfg|lr|iter|model_iter", None),
    Rule(r"conv1_b|pred_[wb]|fc1000_[wb]|.*_bn_(?:rm|riv)", None),
    Rule(r"(?:_\[mask\]_)?res\d_\d+_branch(?:1|2a|2b|2c)_b", None),
    Rule(r"conv1_w", "stem.conv1.weight"),
    Rule(r"res_conv1_bn_(?P<p>[sb])", "stem.bn1.{p}", {"p": _AFFINE}),
    Rule(r"conv1_gn_(?P<p>[sb])", "stem.bn1.{p}", {"p": _GN}),
    Rule(_BLOCK + r"_w", "{stage}.{b}.{br}.weight", {"stage": _STAGE, "br": _CONV}),
    Rule(_BLOCK + r"_bn_(?P<p>[sb])", "{stage}.{b}.{br}.{p}", {"stage": _STAGE, "br": _NORM, "p": _AFFINE}),
    Rule(_BLOCK + r"_gn_(?P<p>[sb])", "{stage}.{b}.{br}.{p}", {"stage": _STAGE, "br": _NORM, "p": _GN}),
    Rule(_FPN_INNER + r"_(?P<p>[wb])", "fpn.lateral{L}.{p}", {"p": _WB}),
    Rule(_FPN_INNER + r"_gn_(?P<p>[sb])", "fpn.lateral{L}.norm.{p}", {"p": _GN}),
    Rule(_FPN_OUT + r"_(?P<p>[wb])", "fpn.output{L}.{p}", {"p": _WB}),
    Rule(_FPN_OUT + r"_gn_(?P<p>[sb])", "fpn.output{L}.norm.{p}", {"p": _GN}),
    Rule(r"(?P<layer>conv_rpn|rpn_cls_logits|rpn_bbox_pred)(?:_fpn\d)?_(?P<p>[wb])", "rpn.{layer}.{p}",
         {"layer": _RPN, "p": _WB}),
    Rule(r"_(?:\[mask\]|mask)_fcn(?P<i>\d+)_gn_(?P<p>[sb])", "mask.fcn{i}.norm.{p}", {"p": _GN}),
    Rule(r"_(?:\[mask\]|mask)_fcn(?P<i>\d+)_(?P<p>[wb])", "mask.fcn{i}.{p}", {"p": _WB}),
    Rule(r"head_conv(?P<i>\d+)_gn_(?P<p>[sb])", "box.conv{i}.norm.{p}", {"p": _GN}),
    Rule(r"head_conv(?P<i>\d+)_(?P<p>[wb])", "box.conv{i}.{p}", {"p": _WB}),
    Rule(r"conv_fcn(?P<i>\d+)_(?P<p>[wb])", "kps.conv_fcn{i}.{p}", {"p": _WB}),
    Rule(r"kps_score_lowres_(?P<p>[wb])", "kps.score_lowres.{p}", {"p": _WB}),
    Rule(r"kps_score_[wb]", None),  # BilinearInterpolation's fixed kernel: our Keypoint_Outs upsamples itself
    Rule(r"(?P<layer>\w+)_(?P<p>[wb])", "{layer}.{p}", {"layer": _HEADS, "p": _WB}),
], hint="RetinaNet, keypoint heads with KRCNN.USE_DECONV (kps_deconv) and other models are not supported.")


def _fpn_blob(f: Dict[str, Any]) -> str:
    """Detectron names an FPN blob after the last block of its stage; the coarsest lateral has no ``_lateral``."""
    stage = f"res{f['L']}_{f['last_block'].get(f['L'], 0)}_sum"
    suffix = f"_gn_{f['p']}" if f.get("norm") else f"_{f['p']}"
    if f["kind"] == "output":
        return f"fpn_{stage}{suffix}"
    return f"fpn_inner_{stage}{'' if f['L'] == f['top'] else '_lateral'}{suffix}"


def _norm_blob(f: Dict[str, Any]) -> str:
    """A ResNet norm: AffineChannel ``_bn_{s,b}`` or, in a GroupNorm body, ``_gn_{s,b}`` (the stem's AffineChannel is
    ``res_conv1_bn``, its GroupNorm ``conv1_gn``)."""
    kind = "gn" if f["gn_body"] else "bn"
    if f.get("stem"):
        return f"conv1_gn_{f['p']}" if f["gn_body"] else f"res_conv1_bn_{f['p']}"
    return f"{f['stage']}_{f['b']}_branch{f['br']}_{kind}_{f['p']}"


def _mask_fcn_blob(f: Dict[str, Any]) -> str:
    """Detectron's GN mask head names its blobs ``_mask_fcn{i}`` (no brackets), the plain one ``_[mask]_fcn{i}``."""
    prefix = "_mask_fcn" if f["gn_mask"] else "_[mask]_fcn"
    return f"{prefix}{f['i']}_gn_{f['p']}" if f.get("norm") else f"{prefix}{f['i']}_{f['p']}"


#: Canonical name -> Detectron blob name (norms already folded to AffineChannel weight/bias).
FROM_CANONICAL = RuleTable("the canonical weights", "Detectron's names", [
    Rule(r"stem\.conv1\.weight", "conv1_w"),
    Rule(r"stem\.bn1\.(?P<p>weight|bias)", lambda f: _norm_blob({**f, "stem": True}), {"p": inverse(_GN)}),
    Rule(r"(?P<stage>res[2-5]|mask_res5)\.(?P<b>\d+)\.(?P<br>conv[123]|downsample\.0)\.weight",
         "{stage}_{b}_branch{br}_w", {"stage": inverse(_STAGE), "br": inverse(_CONV)}),
    Rule(r"(?P<stage>res[2-5]|mask_res5)\.(?P<b>\d+)\.(?P<br>bn[123]|downsample\.1)\.(?P<p>weight|bias)",
         _norm_blob, {"stage": inverse(_STAGE), "br": inverse(_NORM), "p": inverse(_GN)}),
    Rule(r"fpn\.(?P<kind>lateral|output)(?P<L>[2-5])\.(?P<norm>norm\.)(?P<p>weight|bias)", _fpn_blob,
         {"p": inverse(_GN)}),
    Rule(r"fpn\.(?P<kind>lateral|output)(?P<L>[2-5])\.(?P<p>weight|bias)", _fpn_blob, {"p": inverse(_WB)}),
    Rule(r"rpn\.(?P<layer>conv|cls_logits|bbox_pred)\.(?P<p>weight|bias)", "{layer}{rpn_level}_{p}",
         {"layer": inverse(_RPN), "p": inverse(_WB)}),
    Rule(r"mask\.fcn(?P<i>\d+)\.(?P<norm>norm\.)(?P<p>weight|bias)", _mask_fcn_blob, {"p": inverse(_GN)}),
    Rule(r"mask\.fcn(?P<i>\d+)\.(?P<p>weight|bias)", _mask_fcn_blob, {"p": inverse(_WB)}),
    Rule(r"box\.conv(?P<i>\d+)\.norm\.(?P<p>weight|bias)", "head_conv{i}_gn_{p}", {"p": inverse(_GN)}),
    Rule(r"box\.conv(?P<i>\d+)\.(?P<p>weight|bias)", "head_conv{i}_{p}", {"p": inverse(_WB)}),
    Rule(r"kps\.conv_fcn(?P<i>\d+)\.(?P<p>weight|bias)", "conv_fcn{i}_{p}", {"p": inverse(_WB)}),
    Rule(r"kps\.score_lowres\.(?P<p>weight|bias)", "kps_score_lowres_{p}", {"p": inverse(_WB)}),
    Rule(r"(?P<layer>box\.\w+|mask\.\w+)\.(?P<p>weight|bias)", "{layer}_{p}",
         {"layer": inverse(_HEADS), "p": inverse(_WB)}),
])


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
    return "conv1_w" in names or any(re.fullmatch(_BLOCK + r"_(?:w|b|bn_s|bn_b|gn_s|gn_b)", n) or _RPN_RE.match(n)
                                     for n in names[:50])


def detectron_to_canonical(obj: Any) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a loaded Detectron file to canonical names (see :mod:`maskrcnn.utils.weights.common`).

    Returns ``(canonical, notes)``. Momentum, conv biases of bias-free convs and ImageNet classifier blobs
    (``pred_*``, ``fc1000_*``) are dropped and counted in the notes; any other unknown blob is an error.
    """
    blobs = get_blobs(obj)
    arrays = {k: v for k, v in blobs.items() if not isinstance(k, str) or isinstance(v, np.ndarray)}
    rpn_levels = {m.group(1) for m in map(_RPN_RE.match, (k for k in arrays if isinstance(k, str))) if m}
    if len(rpn_levels) > 1:
        raise WeightsConversionError(f"Detectron RPN blobs for several levels {sorted(rpn_levels, key=str)}: the FPN "
                                     "RPN is shared and stored once under its lowest level")
    renamed, dropped = TO_CANONICAL.apply(arrays, convert=to_tensor)
    canonical = affine_channels_to_bn(renamed, "Detectron")
    notes = []
    ignored = len(dropped) + len(blobs) - len(arrays)
    if ignored:
        notes.append(f"Detectron: dropped {ignored} blob(s) Detectron does not load into the network "
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
    """Inverse of :func:`detectron_to_canonical` (batch norms are folded into AffineChannel scale and shift). FPN
    blob names use the last block index of each stage, found from the ``res*`` keys."""
    last_block: Dict[str, int] = {}
    for k in canonical:
        m = re.match(r"^res([2-5])\.(\d+)\.", k)
        if m:
            last_block[m.group(1)] = max(last_block.get(m.group(1), 0), int(m.group(2)))
    # A GroupNorm body has norms with weight/bias only (no statistics); the GN mask head has norms after its convs.
    gn_body = "stem.bn1.weight" in canonical and "stem.bn1.running_mean" not in canonical
    context = {"last_block": last_block, "top": max(last_block) if last_block else "5",
               "rpn_level": "_fpn2" if any(k.startswith("fpn.") for k in canonical) else "",
               "gn_body": gn_body, "gn_mask": any(re.match(r"^mask\.fcn\d+\.norm\.", k) for k in canonical)}
    out, _ = FROM_CANONICAL.apply(bn_to_affine_channels(canonical), context,
                                  convert=lambda t, _: t.detach().cpu().numpy().astype(np.float32))
    return out
