"""Format detection, the canonical weight layout, and conversion of any supported weight file into our state dict.

Every source format (``detectron``, ``detectron.pytorch``, ``torchvision``, ``detectron2``) is first turned into one
*canonical* dict of float32 CPU tensors with Detectron's semantics; :func:`canonical_to_ours` then places it in our
module tree. One mapping per format plus one placement keeps the formats independent of each other and of our
module names (which live in :data:`OUR_NAMES` only).

Canonical keys (``s`` = stage 2..5, ``b`` = block index, ``L`` = pyramid level 2..5)::

    stem.conv1.weight                 stem.bn1.{weight,bias[,running_mean,running_var]}
    res{s}.{b}.conv{1,2,3}.weight     res{s}.{b}.bn{1,2,3}.{...}      (basic blocks: conv1, conv2)
    res{s}.{b}.downsample.0.weight    res{s}.{b}.downsample.1.{...}
    mask_res5.{b}.<as above>          the C4 mask head's own res5 (Detectron's v0up), when it has one
    fpn.lateral{L}.{weight,bias}      fpn.output{L}.{weight,bias}     (+ .norm.{weight,bias} with GroupNorm)
    rpn.conv.*  rpn.cls_logits.*  rpn.bbox_pred.*                     (anchors in Detectron's ratio-major order)
    box.fc6.*  box.fc7.*  box.cls_score.*  box.bbox_pred.*            (class 0 = background; 4 deltas per class)
    mask.fcn{i}.*  mask.conv5_mask.*  mask.logits.*                   (channel 0 = background)

Stage 5 is always ``res5`` whether it belongs to the body (FPN, conv5 bodies) or to the C4 box head, as in Detectron;
the placement decides. A norm entry with four tensors is a batch norm ``y = (x - mean) / sqrt(var + 1e-5) * w + b``
(:data:`CANONICAL_BN_EPS`); Caffe2's AffineChannel ``y = x * s + b`` becomes mean 0, var ``1 - eps`` so the scale
is exactly ``s``. A norm entry with only ``weight``/``bias`` is a GroupNorm.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMATS", "CANONICAL_BN_EPS", "OUR_NAMES", "FORMAT_CFG_HINTS", "WeightsConversionError",
    "detect_format", "convert_to_ours", "convert_file", "canonical_to_ours", "ours_to_canonical",
    "flip_conv1_channels", "to_tensor", "affine_to_bn", "cfg_hint_notes", "describe_canonical", "load_as_ours",
    "is_ours",
]

#: The source formats :func:`convert_to_ours` understands (plus ``"ours"``, which passes through).
FORMATS = ("detectron", "detectron.pytorch", "torchvision", "detectron2")

#: eps of the canonical batch norm, equal to our ``FrozenBatchNorm2d``'s and torchvision's/detectron2's.
CANONICAL_BN_EPS = 1e-5

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class WeightsConversionError(ValueError):
    """A weight file does not fit the requested conversion (unknown tensors, wrong shapes, unsupported layout)."""


# ----------------------------------------------------------------------------------------------------------------
# Tensor helpers shared by the format modules
# ----------------------------------------------------------------------------------------------------------------
def to_tensor(value: Any, name: str) -> Tensor:
    """A float32 CPU tensor from a numpy array or tensor (integer arrays are kept as they are)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise WeightsConversionError(f"weight {name!r} is an object array, not numbers")
        t = torch.from_numpy(np.ascontiguousarray(value).copy())
    else:
        raise WeightsConversionError(f"weight {name!r} is a {type(value).__name__}, not an array or tensor")
    return t.float() if t.is_floating_point() else t


def affine_to_bn(scale: Tensor, shift: Tensor) -> Dict[str, Tensor]:
    """Caffe2 ``AffineChannel`` (``y = x * scale + shift``) as canonical batch-norm buffers with the same output."""
    scale, shift = scale.float(), shift.float()
    return {"weight": scale, "bias": shift, "running_mean": torch.zeros_like(scale),
            "running_var": torch.ones_like(scale) - CANONICAL_BN_EPS}


def flip_conv1_channels(canonical: Dict[str, Tensor]) -> None:
    """Reverse the input-channel order of the first convolution in place (BGR <-> RGB weights)."""
    w = canonical.get("stem.conv1.weight")
    if w is None:
        raise WeightsConversionError("cannot flip input channels: the weights have no stem conv1")
    if w.dim() != 4 or w.shape[1] != 3:
        raise WeightsConversionError(f"cannot flip input channels of a conv1 weight of shape {tuple(w.shape)}")
    canonical["stem.conv1.weight"] = w.flip(1).contiguous()


def unwrap_state_dict(obj: Any, keys: Sequence[str] = ("model", "state_dict", "model_state")) -> Mapping[str, Any]:
    """The state dict inside a checkpoint dict (``{'model': sd, ...}`` and friends), or ``obj`` itself; a
    DataParallel ``module.`` prefix on every key is removed."""
    sd = obj
    for k in keys:
        if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping):
            sd = obj[k]
            break
    if not isinstance(sd, Mapping):
        raise WeightsConversionError(f"expected a dict of weights, got {type(sd).__name__}")
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def raise_unmapped(fmt: str, names: Iterable[str], hint: str = "") -> None:
    names = sorted(names)
    if names:
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        raise WeightsConversionError(
            f"{len(names)} tensor(s) of this {fmt} file have no counterpart in maskrcnn's model: {shown}."
            + (f" {hint}" if hint else ""))


# ----------------------------------------------------------------------------------------------------------------
# Config hints per format
# ----------------------------------------------------------------------------------------------------------------
#: Config values under which a model converted from each format computes what it computed in its framework.
FORMAT_CFG_HINTS: Dict[str, Dict[str, Any]] = {
    "detectron": {"PIXEL_ORDER": "BGR", "PIXEL_SCALE": 255.0, "PIXEL_MEANS": [102.9801, 115.9465, 122.7717],
                  "PIXEL_STDS": [1.0, 1.0, 1.0], "MODEL.LEGACY_PLUS_ONE": True, "RESNETS.STRIDE_1X1": True,
                  "FAST_RCNN.ROI_XFORM_ALIGNED": False},
    "detectron.pytorch": {"PIXEL_ORDER": "BGR", "PIXEL_SCALE": 255.0, "PIXEL_MEANS": [102.9801, 115.9465, 122.7717],
                          "PIXEL_STDS": [1.0, 1.0, 1.0], "MODEL.LEGACY_PLUS_ONE": True,
                          "RESNETS.STRIDE_1X1": True, "FAST_RCNN.ROI_XFORM_ALIGNED": False},
    "torchvision": {"PIXEL_ORDER": "RGB", "PIXEL_SCALE": 1.0, "PIXEL_MEANS": [0.485, 0.456, 0.406],
                    "PIXEL_STDS": [0.229, 0.224, 0.225], "MODEL.LEGACY_PLUS_ONE": False,
                    "RESNETS.STRIDE_1X1": False, "FAST_RCNN.ROI_XFORM_ALIGNED": False},
    "detectron2": {"PIXEL_ORDER": "BGR", "PIXEL_SCALE": 255.0, "PIXEL_MEANS": [103.53, 116.28, 123.675],
                   "PIXEL_STDS": [1.0, 1.0, 1.0], "MODEL.LEGACY_PLUS_ONE": False, "RESNETS.STRIDE_1X1": True,
                   "FAST_RCNN.ROI_XFORM_ALIGNED": True, "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO": 0,
                   "MRCNN.ROI_XFORM_SAMPLING_RATIO": 0},
}


_DEPTH_BY_BLOCKS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def describe_canonical(canonical: Mapping[str, Tensor]) -> Dict[str, Any]:
    """What a canonical weight set says about its architecture: ``depth`` (None if unknown), ``num_groups``,
    ``width_per_group``, ``basic`` (basic blocks), ``fpn``, ``num_classes`` (with background), ``mask``."""
    blocks: Dict[int, int] = {}
    for k in canonical:
        m = re.match(r"^res([2-5])\.(\d+)\.", k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), -1), int(m.group(2)) + 1)
    basic = "res2.0.conv2.weight" in canonical and "res2.0.conv3.weight" not in canonical
    counts = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
    depth = _DEPTH_BY_BLOCKS.get(counts)
    if basic and counts == (3, 4, 6, 3):
        depth = 34
    if depth is None and counts[:3] in ((3, 4, 6), (3, 4, 23), (3, 8, 36)) and counts[3] == 0:
        depth = {(3, 4, 6): 50, (3, 4, 23): 101, (3, 8, 36): 152}[counts[:3]]  # res5 in a C4 box head
    info: Dict[str, Any] = {"depth": depth, "basic": basic, "fpn": any(k.startswith("fpn.") for k in canonical),
                            "num_groups": 1, "width_per_group": 64, "num_classes": None, "mask": False}
    w = canonical.get("res2.0.conv2.weight")
    if w is not None and not basic and w.dim() == 4:
        groups = w.shape[0] // w.shape[1]
        info["num_groups"], info["width_per_group"] = groups, w.shape[0] // groups
    cls = canonical.get("box.cls_score.weight")
    if cls is not None:
        info["num_classes"] = int(cls.shape[0])
    info["mask"] = "mask.logits.weight" in canonical
    return info


def _cfg_get(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
        return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) < 1e-6
    return a == b


def cfg_hint_notes(fmt: str, cfg=None, flipped: bool = False, info: Optional[Mapping[str, Any]] = None
                   ) -> List[str]:
    """Notes telling which config values reproduce ``fmt``'s behaviour; with ``cfg``, the ones it gets wrong.

    ``flipped``: conv1's input channels were reversed, so the expected channel order (and the per-channel means
    and stds) is the other one. ``info``: :func:`describe_canonical` of the weights (adds the ResNeXt shape, and
    the stride placement Detectron uses for its ResNeXt models)."""
    hints = dict(FORMAT_CFG_HINTS[fmt])
    if flipped:
        hints["PIXEL_ORDER"] = "RGB" if hints["PIXEL_ORDER"] == "BGR" else "BGR"
        hints["PIXEL_MEANS"] = list(hints["PIXEL_MEANS"])[::-1]
        hints["PIXEL_STDS"] = list(hints["PIXEL_STDS"])[::-1]
    notes = []
    if info is not None:
        if info.get("num_groups", 1) > 1:
            hints["RESNETS.NUM_GROUPS"] = info["num_groups"]
            hints["RESNETS.WIDTH_PER_GROUP"] = info["width_per_group"]
            if fmt == "detectron":
                # Detectron's ResNeXt ImageNet models (C2/Torch) put the stride in the 3x3 conv.
                hints["RESNETS.STRIDE_1X1"] = False
        arch = []
        if info.get("depth"):
            kind = "ResNeXt" if info.get("num_groups", 1) > 1 else "ResNet"
            arch.append(f"{kind}-{info['depth']}")
        heads = info.get("num_classes") is not None
        arch.append("FPN" if info.get("fpn") else ("C4" if heads else "backbone only"))
        if info.get("num_classes") is not None:
            arch.append(f"{info['num_classes']} classes incl. background"
                        + (", masks" if info.get("mask") else ", no masks"))
        if arch:
            notes.append(f"{fmt} weights: " + ", ".join(arch) + ".")
    want = ", ".join(f"{k} {v}" for k, v in hints.items())
    notes.append(f"{fmt} weights expect: {want}.")
    if cfg is not None:
        bad = []
        for key, value in hints.items():
            try:
                have = _cfg_get(cfg, key)
            except AttributeError:
                continue
            if not _same(have, value):
                bad.append(f"{key} is {have!r} (expected {value!r})")
        if bad:
            notes.append("WARNING: the config differs from what these weights expect: " + "; ".join(bad) + ".")
        if info is not None and info.get("num_classes") is not None and int(cfg.MODEL.NUM_CLASSES) != \
                info["num_classes"]:
            notes.append(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but the weights have "
                         f"{info['num_classes']} classes: loading keeps all but the class-specific layers "
                         "(fine-tuning).")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Canonical -> ours
# ----------------------------------------------------------------------------------------------------------------
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
    "mask.conv5_mask": "Mask_Head.conv5_mask",
    "mask.logits": "Mask_Outs.mask_fcn_logits",
}

_STAGE_RE = re.compile(r"^(res[2-5]|mask_res5)\.(\d+)\.(.+)$")
_FPN_RE = re.compile(r"^fpn\.(lateral|output)([2-6])\.(norm\.)?(weight|bias)$")
_HEAD_RE = re.compile(r"^(rpn\.conv|rpn\.cls_logits|rpn\.bbox_pred|box\.fc6|box\.fc7|box\.cls_score|box\.bbox_pred|"
                      r"mask\.fcn\d+|mask\.conv5_mask|mask\.logits)\.(weight|bias)$")


def _layout_from_cfg(cfg) -> Optional[str]:
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
    layout = layout or (_layout_from_target(target) if target is not None else None) or _layout_from_cfg(cfg) \
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
            fcn = re.match(r"^mask\.fcn(\d+)$", head)
            name = OUR_NAMES["mask.fcn{i}"].format(i=fcn.group(1)) if fcn else OUR_NAMES[head]
            out[f"{name}.{what}"] = t
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
        if canon.startswith(("rpn.", "box.", "mask.")) and "{i}" not in canon:
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
    fcn = re.compile("^" + re.escape(OUR_NAMES["mask.fcn{i}"]).replace(r"\{i\}", r"(\d+)") + r"\.(\w+)$")
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
        elif fcn.match(key):
            m = fcn.match(key)
            out[f"mask.fcn{m.group(1)}.{m.group(2)}"] = t
        else:
            head, _, what = key.rpartition(".")
            if head not in heads:
                raise WeightsConversionError(f"our key {key!r} has no canonical name")
            out[f"{heads[head]}.{what}"] = t
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------
_OUR_TOP = ("Conv_Body.", "RPN.", "Box_Head.", "Box_Outs.", "Mask_Head.", "Mask_Outs.")


def is_ours(obj: Any) -> bool:
    """True for a checkpoint of ours (``{'model': state_dict, ...}``) or a bare state dict of ours: every key under
    one of our top-level modules, and not Detectron.pytorch's names (which share the top-level ones)."""
    from .detectron_pytorch import is_detectron_pytorch

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
    from .detectron import is_detectron_blobs
    from .detectron2 import is_detectron2
    from .detectron_pytorch import is_detectron_pytorch
    from .torchvision import is_torchvision

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
        from .detectron import detectron_to_canonical
        return detectron_to_canonical(obj)
    if fmt == "detectron.pytorch":
        from .detectron_pytorch import detectron_pytorch_to_canonical
        shares = None
        if cfg is not None and _layout_from_cfg(cfg) == "c4" and cfg.MODEL.MASK_ON:
            shares = str(cfg.MRCNN.ROI_MASK_HEAD).endswith("v0upshare")
        return detectron_pytorch_to_canonical(obj, mask_head_shares_res5=shares)
    if fmt == "torchvision":
        from .torchvision import torchvision_to_canonical
        return torchvision_to_canonical(obj)
    if fmt == "detectron2":
        from .detectron2 import detectron2_to_canonical
        grid = None
        if cfg is not None and not cfg.FPN.FPN_ON and "fpn" not in str(cfg.MODEL.CONV_BODY).lower():
            grid = (len(cfg.RPN.SIZES), len(cfg.RPN.ASPECT_RATIOS))
        return detectron2_to_canonical(obj, anchor_grid=grid)
    raise WeightsConversionError(f"fmt={fmt!r} is not a supported weight format; use one of {FORMATS}")


#: Channel order each format's first convolution expects.
_PIXEL_ORDER = {"detectron": "BGR", "detectron.pytorch": "BGR", "torchvision": "RGB", "detectron2": "BGR"}


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
            and its ``PIXEL_ORDER`` differs from the format's.
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
    if flip is None:
        flip = cfg is not None and str(cfg.PIXEL_ORDER).upper() != _PIXEL_ORDER[fmt]
    if flip:
        flip_conv1_channels(canonical)
        notes.append(f"conv1 input channels flipped ({_PIXEL_ORDER[fmt]} -> "
                     f"{'RGB' if _PIXEL_ORDER[fmt] == 'BGR' else 'BGR'}).")
    has_heads = any(k.startswith(("rpn.", "box.", "mask.")) for k in canonical)
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
    from .safe_pickle import load_weights_file

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
