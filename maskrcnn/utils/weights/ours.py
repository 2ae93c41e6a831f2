"""Placement of canonical tensors (:mod:`maskrcnn.utils.weights.common`) in ``Generalized_RCNN``'s state dict,
and back: where each canonical name lives in our module tree (:data:`OUR_NAMES`), which depends on the layout
(FPN, C4 or conv5 body) and on the C4 mask head."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .common import WeightsConversionError

__all__ = ["OUR_NAMES", "MASK_HEADS_WITH_RES5_COPY", "canonical_to_ours", "ours_to_canonical", "layout_from_cfg"]

#: Where canonical tensors live in ``Generalized_RCNN``. ``{body}`` is ``Conv_Body.`` (C4 / conv5 bodies) or
#: ``Conv_Body.conv_body.`` (FPN bodies).
OUR_NAMES: Dict[str, str] = {
    "body": "Conv_Body.",
    "fpn_body": "Conv_Body.conv_body.",
    "fpn_lateral": "Conv_Body.fpn.lateral_convs.{i}",
    "fpn_output": "Conv_Body.fpn.output_convs.{i}",
    "box_res5": "Box_Head.res5.",
    "mask_res5": "Mask_Head.res5.",
    "rpn.conv": "RPN.head.RPN_conv",
    "rpn.cls_logits": "RPN.head.RPN_cls_score",
    "rpn.bbox_pred": "RPN.head.RPN_bbox_pred",
    "box.fc6": "Box_Head.fc6",
    "box.fc7": "Box_Head.fc7",
    "box.cls_score": "Box_Outs.cls_score",
    "box.bbox_pred": "Box_Outs.bbox_pred",
    "mask.fcn{i}": "Mask_Head.mask_fcn{i}",
    "mask.fcn{i}.norm": "Mask_Head.mask_fcn{i}_gn",
    "box.conv{i}": "Box_Head.head_conv{i}",
    "box.conv{i}.norm": "Box_Head.head_conv{i}_gn",
    "mask.conv5_mask": "Mask_Head.conv5_mask",
    "mask.logits": "Mask_Outs.mask_fcn_logits",
    "kps.conv_fcn{i}": "Keypoint_Head.conv_fcn{i}",
    "kps.score_lowres": "Keypoint_Outs.kps_score_lowres",
    # Cascade R-CNN stage k (CascadeROIHeads' ModuleLists).
    "box.stage{k}.fc6": "Box_Head.{k}.fc6",
    "box.stage{k}.fc7": "Box_Head.{k}.fc7",
    "box.stage{k}.cls_score": "Box_Outs.{k}.cls_score",
    "box.stage{k}.bbox_pred": "Box_Outs.{k}.bbox_pred",
    "box.stage{k}.conv{i}": "Box_Head.{k}.head_conv{i}",
    "box.stage{k}.conv{i}.norm": "Box_Head.{k}.head_conv{i}_gn",
}

_STAGE_RE = re.compile(r"^(res[2-5]|mask_res5)\.(\d+)\.(.+)$")
_FPN_RE = re.compile(r"^fpn\.(lateral|output)([2-6])\.(norm\.)?(weight|bias)$")
_HEAD_RE = re.compile(r"^(rpn\.conv|rpn\.cls_logits|rpn\.bbox_pred|box\.fc6|box\.fc7|box\.cls_score|box\.bbox_pred|"
                      r"mask\.conv5_mask|mask\.logits|kps\.score_lowres)\.(weight|bias)$")
# Numbered head convs, each with an optional GroupNorm (``.norm``): mask.fcn{i} (v1up4convs[_gn]), box.conv{i}
# (roi_Xconv1fc[_gn]_head), kps.conv_fcn{i} (roi_pose_head_v1convX, no norm).
_NUMBERED_RE = re.compile(r"^(mask\.fcn|box\.conv|kps\.conv_fcn)(\d+)(\.norm)?\.(weight|bias)$")
_CASCADE_RE = re.compile(r"^box\.stage(\d+)\.(fc6|fc7|cls_score|bbox_pred|conv(\d+)(\.norm)?)\.(weight|bias)$")
_OURS_CASCADE_RE = re.compile(r"^(Box_Head|Box_Outs)\.(\d+)\.(fc6|fc7|cls_score|bbox_pred|head_conv(\d+)(_gn)?)\."
                              r"(weight|bias)$")


def layout_from_cfg(cfg) -> Optional[str]:
    """``"fpn"``, ``"c4"`` or ``"c5"``: where ``cfg.MODEL.CONV_BODY`` puts res5 (None without a config)."""
    if cfg is None:
        return None
    body = str(cfg.MODEL.CONV_BODY)
    if "fpn" in body.lower():
        return "fpn"
    return "c5" if "conv5" in body else "c4"


def _layout_from_target(target: Mapping[str, Any]) -> Optional[str]:
    if any(k.startswith("Conv_Body.fpn.") for k in target):
        return "fpn"
    if any(k.startswith(OUR_NAMES["box_res5"]) for k in target):
        return "c4"
    if any(k.startswith(OUR_NAMES["body"] + "res5.") for k in target):
        return "c5"
    if any(k.startswith(OUR_NAMES["body"] + "res4.") for k in target):
        return "c4"
    return None


def _layout_from_canonical(canonical: Mapping[str, Tensor]) -> Optional[str]:
    if any(k.startswith("fpn.") for k in canonical):
        return "fpn"
    has_res5 = any(k.startswith("res5.") for k in canonical)
    if any(k.startswith("box.fc6.") for k in canonical):
        return "c5" if has_res5 else None
    if any(k.startswith("box.") or k.startswith("mask.") for k in canonical):
        return "c4"
    return None if has_res5 else "c4"


def _placement(layout: str, target: Optional[Mapping[str, Any]], cfg) -> Dict[str, Any]:
    body = OUR_NAMES["fpn_body"] if layout == "fpn" else OUR_NAMES["body"]
    res5 = [OUR_NAMES["box_res5"]] if layout == "c4" else [body + "res5."]
    if layout == "c4":
        if target is not None:
            shared_copy = any(k.startswith(OUR_NAMES["mask_res5"]) for k in target)
        else:
            shared_copy = cfg is not None and bool(cfg.MODEL.MASK_ON) and str(cfg.MRCNN.ROI_MASK_HEAD).endswith(
                MASK_HEADS_WITH_RES5_COPY)
        if shared_copy:
            res5.append(OUR_NAMES["mask_res5"])
    return {"body": body, "res5": res5}


#: C4 mask heads (``MRCNN.ROI_MASK_HEAD`` suffixes) that own a ``Mask_Head.res5``. Without ``_[mask]_res5`` weights
#: in the file it starts from the file's res5, as Detectron loads ``_[mask]_foo`` from ``foo``.
MASK_HEADS_WITH_RES5_COPY: Tuple[str, ...] = ("v0up",)


def _fpn_key(kind: str, level: int, rest: str, gn: bool) -> str:
    base = OUR_NAMES["fpn_lateral" if kind == "lateral" else "fpn_output"].format(i=level - 2)
    if not gn:
        return f"{base}.{rest}"
    # GroupNorm FPN blocks are Sequential(conv, GroupNorm).
    return f"{base}.1.{rest[len('norm.'):]}" if rest.startswith("norm.") else f"{base}.0.{rest}"


def canonical_to_ours(canonical: Mapping[str, Tensor], *, cfg=None, target: Optional[Mapping[str, Tensor]] = None,
                      layout: Optional[str] = None) -> Tuple["OrderedDict[str, Tensor]", List[str]]:
    """Place canonical tensors in ``Generalized_RCNN``'s state dict.

    Args:
        canonical: see the module docstring.
        cfg: the config of the model the weights are for (decides C4/conv5/FPN and the C4 mask head).
        target: the model's ``state_dict()`` (or any mapping with its keys); most precise: it settles the layout,
            the C4 mask head's res5 copy and BatchNorm counters.
        layout: ``"fpn"``, ``"c4"`` or ``"c5"``; overrides what cfg/target/canonical say.
    Returns ``(state_dict, notes)``.
    """
    layout = layout or (_layout_from_target(target) if target is not None else None) or layout_from_cfg(cfg) \
        or _layout_from_canonical(canonical)
    if layout is None:
        raise WeightsConversionError("these weights hold a backbone only (with res5) and the model layout is "
                                     "unknown: pass the model's config (cfg) so that res5 can be placed")
    if layout not in ("fpn", "c4", "c5"):
        raise WeightsConversionError(f"layout={layout!r} must be 'fpn', 'c4' or 'c5'")
    place = _placement(layout, target, cfg)
    gn_fpn = {(m.group(1), int(m.group(2))) for m in map(_FPN_RE.match, canonical) if m and m.group(3)}
    own_mask_res5 = any(k.startswith("mask_res5.") for k in canonical)
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    notes: List[str] = []
    for key, t in canonical.items():
        if key.startswith("stem."):
            out[place["body"] + "res1." + key[len("stem."):]] = t
            continue
        m = _STAGE_RE.match(key)
        if m:
            stage, block, rest = m.groups()
            if stage == "mask_res5":
                dsts = [OUR_NAMES["mask_res5"]]
            elif stage == "res5":
                # A mask head with its own res5 (canonical mask_res5) gets no copy of the box head's.
                dsts = [p for p in place["res5"] if not (p == OUR_NAMES["mask_res5"] and own_mask_res5)]
            else:
                dsts = [place["body"] + stage + "."]
            for dst in dsts:
                out[f"{dst}{block}.{rest}"] = t
            continue
        m = _FPN_RE.match(key)
        if m:
            kind, level = m.group(1), int(m.group(2))
            if level > 5:
                raise WeightsConversionError(f"{key}: convolutional FPN levels above P5 (RetinaNet-style) are not "
                                             "supported; P6 is a max-pool")
            out[_fpn_key(kind, level, key.split(f"{kind}{level}.", 1)[1], (kind, level) in gn_fpn)] = t
            continue
        m = _HEAD_RE.match(key)
        if m:
            head, what = m.groups()
            out[f"{OUR_NAMES[head]}.{what}"] = t
            continue
        m = _NUMBERED_RE.match(key)
        if m:
            head, i, norm, what = m.groups()
            out[f"{OUR_NAMES[head + '{i}' + (norm or '')].format(i=i)}.{what}"] = t
            continue
        m = _CASCADE_RE.match(key)
        if m:
            k, layer, i, norm, what = m.groups()
            canon = f"box.stage{{k}}.conv{{i}}{norm or ''}" if i is not None else f"box.stage{{k}}.{layer}"
            out[f"{OUR_NAMES[canon].format(k=k, i=i)}.{what}"] = t
            continue
        raise WeightsConversionError(f"canonical tensor {key!r} has no place in maskrcnn's model")
    if target is not None:
        _match_target(out, target, notes)
    return out, notes


def _match_target(out: "OrderedDict[str, Tensor]", target: Mapping[str, Any], notes: List[str]) -> None:
    """Settle what only the model knows: BatchNorm counters, and class-agnostic box/mask layers holding the
    foreground part of a 2-class layout."""
    added = 0
    for key in target:
        if key.endswith(".num_batches_tracked") and key not in out:
            head = key[: -len("num_batches_tracked")]
            if head + "running_mean" in out:
                out[key] = torch.zeros((), dtype=torch.long)
                added += 1
    if added:
        notes.append(f"set {added} BatchNorm num_batches_tracked counter(s) to 0.")
    for key in (OUR_NAMES["box.bbox_pred"] + ".weight", OUR_NAMES["box.bbox_pred"] + ".bias",
                OUR_NAMES["mask.logits"] + ".weight", OUR_NAMES["mask.logits"] + ".bias"):
        if key in out and key in target and hasattr(target[key], "shape"):
            have, want = out[key].shape[0], target[key].shape[0]
            per = 4 if "bbox_pred" in key else 1
            if have == 2 * per and want == per:
                out[key] = out[key][per:].contiguous()
                notes.append(f"{key}: kept the foreground part of the 2-class layout (class-agnostic layer).")


def ours_to_canonical(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of :func:`canonical_to_ours` (used to export our weights and by the tests). ``num_batches_tracked``
    counters and the C4 mask head's shared res5 copy are left out."""
    fpn = any(k.startswith("Conv_Body.fpn.") for k in state_dict)
    body = OUR_NAMES["fpn_body"] if fpn else OUR_NAMES["body"]
    heads = {}
    for canon, ours in OUR_NAMES.items():
        if canon.startswith(("rpn.", "box.", "mask.", "kps.")) and "{i}" not in canon and "{k}" not in canon:
            heads[ours] = canon
    own_mask_res5 = False
    box_res5 = {k[len(OUR_NAMES["box_res5"]):]: v for k, v in state_dict.items() if k.startswith(OUR_NAMES["box_res5"])}
    mask_res5 = {k[len(OUR_NAMES["mask_res5"]):]: v for k, v in state_dict.items()
                 if k.startswith(OUR_NAMES["mask_res5"])}
    if mask_res5:
        own_mask_res5 = not (mask_res5.keys() == box_res5.keys() and all(
            torch.equal(mask_res5[k], box_res5[k]) for k in mask_res5))
    lat = re.compile("^" + re.escape(OUR_NAMES["fpn_lateral"]).replace(r"\{i\}", r"(\d+)") + r"\.(?:(\d)\.)?(\w+)$")
    outp = re.compile("^" + re.escape(OUR_NAMES["fpn_output"]).replace(r"\{i\}", r"(\d+)") + r"\.(?:(\d)\.)?(\w+)$")
    numbered = [(canon, re.compile("^" + re.escape(OUR_NAMES[canon]).replace(r"\{i\}", r"(\d+)") + r"\.(\w+)$"))
                for canon in ("mask.fcn{i}", "mask.fcn{i}.norm", "box.conv{i}", "box.conv{i}.norm", "kps.conv_fcn{i}")]
    out: Dict[str, Tensor] = OrderedDict()
    for key, t in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(body + "res1."):
            out["stem." + key[len(body + "res1."):]] = t
        elif key.startswith(body) and re.match(r"^res[2-5]\.", key[len(body):]):
            out[key[len(body):]] = t
        elif key.startswith(OUR_NAMES["box_res5"]):
            out["res5." + key[len(OUR_NAMES["box_res5"]):]] = t
        elif key.startswith(OUR_NAMES["mask_res5"]):
            if own_mask_res5:
                out["mask_res5." + key[len(OUR_NAMES["mask_res5"]):]] = t
        elif lat.match(key) or outp.match(key):
            m = lat.match(key) or outp.match(key)
            kind = "lateral" if lat.match(key) else "output"
            i, sub, what = m.groups()
            norm = "norm." if sub == "1" else ""
            out[f"fpn.{kind}{int(i) + 2}.{norm}{what}"] = t
        elif _OURS_CASCADE_RE.match(key):
            part, k, layer, i, gn, what = _OURS_CASCADE_RE.match(key).groups()
            name = f"conv{i}{'.norm' if gn else ''}" if i is not None else layer
            out[f"box.stage{k}.{name}.{what}"] = t
        elif any(r.match(key) for _, r in numbered):
            canon, m = next((c, r.match(key)) for c, r in numbered if r.match(key))
            out[f"{canon.format(i=m.group(1))}.{m.group(2)}"] = t
        else:
            head, _, what = key.rpartition(".")
            if head not in heads:
                raise WeightsConversionError(f"our key {key!r} has no canonical name")
            out[f"{heads[head]}.{what}"] = t
    return out
