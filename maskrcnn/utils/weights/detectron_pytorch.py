"""Detectron.pytorch (roytseng-tw) checkpoints: ``torch.save({'step', 'train_size', 'batch_size', 'model':
state_dict, 'optimizer'})``.

Module names (from its ``lib/modeling/*.py`` and their ``detectron_weight_mapping``)::

    Conv_Body.res1.conv1.weight  Conv_Body.res1.bn1.{weight,bias}      AffineChannel2d: scale and shift only
    Conv_Body.res{s}.{b}.conv{1,2,3}.weight  .bn{1,2,3}.{weight,bias}  .downsample.0.weight  .downsample.1.*
    (GN models: .gn1/.gn2/.gn3, stem res1.gn1)
    FPN bodies: the ResNet under Conv_Body.conv_body.*, and
      Conv_Body.conv_top.*                          1x1 on res5            (Detectron fpn_inner_res5_2_sum)
      Conv_Body.topdown_lateral_modules.{i}.conv_lateral.*   i = 0, 1, 2 -> res4, res3, res2
      Conv_Body.posthoc_modules.{i}.*                        i = 0..3    -> res5, res4, res3, res2 (3x3 outputs)
    RPN.FPN_RPN_conv / FPN_RPN_cls_score / FPN_RPN_bbox_pred      (C4: RPN.RPN_conv / RPN_cls_score / RPN_bbox_pred)
    Box_Head.fc1 / fc2 (roi_2mlp_head, Detectron fc6/fc7)        or Box_Head.res5.* (ResNet_roi_conv5_head)
    Box_Outs.cls_score / bbox_pred
    Mask_Head.conv_fcn.{0,2,4,6} (3x3 convs, ReLUs between) + Mask_Head.upconv   (v1up4convs)
    Mask_Head.upconv5 (+ Mask_Head.res5.*: the box head's res5 for v0upshare, its own for v0up)
    Mask_Outs.classify

Weights were ported from Detectron unchanged, so they expect Detectron's BGR 0..255 input and "+1" boxes.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .formats import WeightsConversionError, affine_to_bn, raise_unmapped, to_tensor, unwrap_state_dict

__all__ = ["is_detectron_pytorch", "detectron_pytorch_to_canonical", "canonical_to_detectron_pytorch"]

# Names only Detectron.pytorch uses (its ResNet body, Conv_Body.conv_body.*, has our names).
_MARKERS = re.compile(r"^(Conv_Body\.conv_top|Conv_Body\.topdown_lateral_modules|Conv_Body\.posthoc_modules|"
                      r"RPN\.FPN_RPN_|RPN\.RPN_(conv|cls_score|bbox_pred)\.|Box_Head\.fc[12]\.|"
                      r"Mask_Head\.conv_fcn\.|Mask_Head\.upconv|Mask_Outs\.classify\.)")
# Names only maskrcnn uses (a GroupNorm body of ours also has norms without running statistics).
_OUR_MARKERS = re.compile(r"^(RPN\.head\.RPN_|Conv_Body\.fpn\.|Box_Head\.fc[67]\.|Mask_Head\.mask_fcn|"
                          r"Mask_Head\.conv5_mask\.|Mask_Outs\.mask_fcn_logits\.)")
_RES_RE = re.compile(r"^(res[1-5])\.(?:(\d+)\.)?(conv[123]|bn[123]|gn[123]|downsample\.[01])\.(weight|bias)$")


def is_detectron_pytorch(obj: Any) -> bool:
    """True for a Detectron.pytorch checkpoint (its module names, or an affine-only ``Conv_Body.res1.bn1``)."""
    try:
        sd = unwrap_state_dict(obj)
    except WeightsConversionError:
        return False
    keys = [k for k in sd if isinstance(k, str)]
    if any(_OUR_MARKERS.match(k) for k in keys):
        return False
    if any(_MARKERS.match(k) for k in keys):
        return True
    # Its ResNet bodies have our names but AffineChannel2d norms (no running statistics).
    return any(k.endswith("res1.bn1.weight") and k[: -len("weight")] + "running_mean" not in sd for k in keys)


def _resnet(name: str, t: Tensor, prefix: str, canonical: Dict[str, Tensor],
            norms: Dict[Tuple[str, str], Dict[str, Tensor]]) -> bool:
    m = _RES_RE.match(name)
    if not m:
        return False
    stage, block, layer, what = m.groups()
    if stage == "res1":
        if block is not None or layer not in ("conv1", "bn1", "gn1"):
            return False
        base = "stem"
    else:
        if block is None:
            return False
        base = f"{prefix}{stage}.{block}" if prefix else f"{stage}.{block}"
    if layer.startswith("conv") or layer == "downsample.0":
        if what != "weight":
            return False
        canonical[f"{base}.{layer}.weight"] = t
        return True
    kind = "gn" if layer.startswith("gn") else "bn"
    canon_layer = "downsample.1" if layer == "downsample.1" else "bn" + layer[-1]
    norms.setdefault((f"{base}.{canon_layer}", kind), {})[what] = t
    return True


def detectron_pytorch_to_canonical(obj: Any, mask_head_shares_res5: Optional[bool] = None
                                   ) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a Detectron.pytorch checkpoint (or its bare state dict) to canonical names.

    ``mask_head_shares_res5``: whether ``Mask_Head.res5`` is the box head's (v0upshare) or its own (v0up); None
    decides from the values (a shared module saves equal tensors twice). Returns ``(canonical, notes)``.
    """
    sd = unwrap_state_dict(obj)
    canonical: Dict[str, Tensor] = OrderedDict()
    norms: Dict[Tuple[str, str], Dict[str, Tensor]] = OrderedDict()
    mask_res5: Dict[str, Tensor] = OrderedDict()
    unmapped: List[str] = []
    for name, value in sd.items():
        t = to_tensor(value, name)
        if name.startswith("Conv_Body.conv_body."):
            if _resnet(name[len("Conv_Body.conv_body."):], t, "", canonical, norms):
                continue
        elif name.startswith("Conv_Body."):
            rest = name[len("Conv_Body."):]
            if _resnet(rest, t, "", canonical, norms):
                continue
            m = re.match(r"^(conv_top|topdown_lateral_modules\.(\d+)\.conv_lateral|posthoc_modules\.(\d+))"
                         r"(?:\.(\d))?\.(weight|bias)$", rest)
            if m:
                head, lat_i, post_i, sub, what = m.groups()
                level = 5 if head == "conv_top" else (4 - int(lat_i) if lat_i is not None else 5 - int(post_i))
                prefix = f"fpn.{'output' if post_i is not None else 'lateral'}{level}"
                # GN variants are Sequential(conv, GroupNorm): index 0 the conv, 1 the norm.
                canonical[f"{prefix}.norm.{what}" if sub == "1" else f"{prefix}.{what}"] = t
                continue
        elif name.startswith("RPN."):
            m = re.match(r"^RPN\.(?:FPN_)?RPN_(conv|cls_score|bbox_pred)\.(weight|bias)$", name)
            if m:
                layer = {"conv": "rpn.conv", "cls_score": "rpn.cls_logits", "bbox_pred": "rpn.bbox_pred"}[m.group(1)]
                canonical[f"{layer}.{m.group(2)}"] = t
                continue
        elif name.startswith("Box_Head."):
            rest = name[len("Box_Head."):]
            m = re.match(r"^fc([12])\.(weight|bias)$", rest)
            if m:
                canonical[f"box.fc{5 + int(m.group(1))}.{m.group(2)}"] = t
                continue
            if rest.startswith("res5.") and _resnet(rest, t, "", canonical, norms):
                continue
        elif name.startswith("Box_Outs."):
            m = re.match(r"^Box_Outs\.(cls_score|bbox_pred)\.(weight|bias)$", name)
            if m:
                canonical[f"box.{m.group(1)}.{m.group(2)}"] = t
                continue
        elif name.startswith("Mask_Head."):
            rest = name[len("Mask_Head."):]
            m = re.match(r"^conv_fcn\.(\d+)\.(weight|bias)$", rest)
            if m and int(m.group(1)) % 2 == 0:
                canonical[f"mask.fcn{int(m.group(1)) // 2 + 1}.{m.group(2)}"] = t
                continue
            m = re.match(r"^upconv5?\.(weight|bias)$", rest)
            if m:
                canonical[f"mask.conv5_mask.{m.group(1)}"] = t
                continue
            if rest.startswith("res5."):
                mask_res5[rest] = t
                continue
        elif name.startswith("Mask_Outs."):
            m = re.match(r"^Mask_Outs\.classify\.(weight|bias)$", name)
            if m:
                canonical[f"mask.logits.{m.group(1)}"] = t
                continue
        unmapped.append(name)
    raise_unmapped("Detectron.pytorch", unmapped, "Keypoint heads, roi_Xconv1fc heads and GN mask heads are not "
                   "supported.")
    notes: List[str] = []
    if mask_res5:
        box_keys = {k: to_tensor(v, k) for k, v in sd.items() if k.startswith("Box_Head.res5.")}
        shared = mask_head_shares_res5
        if shared is None:
            shared = len(box_keys) == len(mask_res5) and all(
                f"Box_Head.{k}" in box_keys and torch.equal(box_keys[f"Box_Head.{k}"], v) for k, v in mask_res5.items())
        if shared:
            notes.append("Detectron.pytorch: Mask_Head.res5 is the box head's res5 (v0upshare); kept once.")
        else:
            own_norms: Dict[Tuple[str, str], Dict[str, Tensor]] = OrderedDict()
            for k, v in mask_res5.items():
                if not _resnet(k, v, "mask_", canonical, own_norms):
                    raise_unmapped("Detectron.pytorch", [f"Mask_Head.{k}"])
            norms.update(own_norms)
            notes.append("Detectron.pytorch: Mask_Head.res5 is the mask head's own res5 (v0up).")
    for (prefix, kind), parts in norms.items():
        if "weight" not in parts or "bias" not in parts:
            raise WeightsConversionError(f"Detectron.pytorch norm {prefix!r} needs both weight and bias")
        if kind == "bn":
            for k, v in affine_to_bn(parts["weight"], parts["bias"]).items():
                canonical[f"{prefix}.{k}"] = v
        else:
            canonical[f"{prefix}.weight"], canonical[f"{prefix}.bias"] = parts["weight"], parts["bias"]
    cls = canonical.get("rpn.cls_logits.weight")
    box = canonical.get("rpn.bbox_pred.weight")
    if cls is not None and box is not None and 4 * cls.shape[0] != box.shape[0]:
        raise WeightsConversionError(
            f"Detectron.pytorch RPN has {cls.shape[0]} objectness channels for {box.shape[0] // 4} anchors: a "
            "softmax RPN (RPN.CLS_ACTIVATION 'softmax'); only the sigmoid RPN is supported")
    return canonical, notes


def canonical_to_detectron_pytorch(canonical: Mapping[str, Tensor], mask_head_shares_res5: bool = True
                                   ) -> Dict[str, Tensor]:
    """Inverse of :func:`detectron_pytorch_to_canonical` (batch norms folded into AffineChannel scale/shift).
    Writes ``Mask_Head.res5`` as a copy of ``Box_Head.res5`` for a C4 mask head when ``mask_head_shares_res5``."""
    fpn = any(k.startswith("fpn.") for k in canonical)
    body = "Conv_Body.conv_body." if fpn else "Conv_Body."
    out: Dict[str, Tensor] = OrderedDict()
    done = set()
    c4_res5 = not fpn and any(k.startswith("box.") for k in canonical) and not any(
        k.startswith("box.fc") for k in canonical)
    for key, t in canonical.items():
        if key in done:
            continue
        m = re.match(r"^(stem|mask_res5\.\d+|res[2-5]\.\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$", key)
        if m:
            prefix, layer, what = m.groups()
            if prefix == "stem":
                dst = f"{body}res1.{layer}"
            elif prefix.startswith("mask_res5"):
                dst = f"Mask_Head.res5.{prefix.split('.')[1]}.{layer}"
            elif prefix.startswith("res5") and c4_res5:
                dst = f"Box_Head.{prefix}.{layer}"
            else:
                dst = f"{body}{prefix}.{layer}"
            if layer.startswith("conv") or layer == "downsample.0":
                out[f"{dst}.weight"] = t
                continue
            head = key.rsplit(".", 1)[0]
            w, b = canonical[f"{head}.weight"], canonical[f"{head}.bias"]
            mean, var = canonical.get(f"{head}.running_mean"), canonical.get(f"{head}.running_var")
            if mean is not None and var is not None:
                scale = w / (var + 1e-5).sqrt()
                w, b = scale, b - mean * scale
            out[f"{dst}.weight"], out[f"{dst}.bias"] = w, b
            done.update(f"{head}.{k}" for k in ("weight", "bias", "running_mean", "running_var"))
            continue
        m = re.match(r"^fpn\.(lateral|output)([2-5])\.(weight|bias)$", key)
        if m:
            kind, level, what = m.group(1), int(m.group(2)), m.group(3)
            if kind == "output":
                out[f"Conv_Body.posthoc_modules.{5 - level}.{what}"] = t
            elif level == 5:
                out[f"Conv_Body.conv_top.{what}"] = t
            else:
                out[f"Conv_Body.topdown_lateral_modules.{4 - level}.conv_lateral.{what}"] = t
            continue
        head, _, what = key.rpartition(".")
        simple = {"rpn.conv": "RPN_conv", "rpn.cls_logits": "RPN_cls_score", "rpn.bbox_pred": "RPN_bbox_pred"}
        if head in simple:
            out[f"RPN.{'FPN_' if fpn else ''}{simple[head]}.{what}"] = t
            continue
        names = {"box.fc6": "Box_Head.fc1", "box.fc7": "Box_Head.fc2", "box.cls_score": "Box_Outs.cls_score",
                 "box.bbox_pred": "Box_Outs.bbox_pred", "mask.logits": "Mask_Outs.classify",
                 "mask.conv5_mask": "Mask_Head.upconv" if fpn else "Mask_Head.upconv5"}
        if head in names:
            out[f"{names[head]}.{what}"] = t
            continue
        m = re.match(r"^mask\.fcn(\d+)$", head)
        if m:
            out[f"Mask_Head.conv_fcn.{2 * (int(m.group(1)) - 1)}.{what}"] = t
            continue
        raise WeightsConversionError(f"canonical tensor {key!r} has no Detectron.pytorch name")
    if mask_head_shares_res5 and c4_res5 and "mask.conv5_mask.weight" in canonical and not any(
            k.startswith("mask_res5.") for k in canonical):
        for k in [k for k in out if k.startswith("Box_Head.res5.")]:
            out["Mask_Head." + k[len("Box_Head."):]] = out[k]
    return out
