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
    Mask_Head.conv_fcn.{0,3,6,9} convs, .{1,4,7,10} GroupNorms (v1upXconvs_gn: conv, GN, ReLU triples)
    Box_Head.convs.{0,3,6,9} convs, .{1,4,7,10} GroupNorms, Box_Head.fc    (roi_Xconv1fc_gn_head; Detectron fc6)
    Mask_Head.upconv5 (+ Mask_Head.res5.*: the box head's res5 for v0upshare, its own for v0up)
    Mask_Outs.classify

Weights were ported from Detectron unchanged, so they expect Detectron's BGR 0..255 input and "+1" boxes.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .common import (WeightsConversionError, affine_channels_to_bn, bn_to_affine_channels, to_tensor,
                     unwrap_state_dict)
from .rules import PARAM, Rule, RuleTable, inverse

__all__ = ["is_detectron_pytorch", "detectron_pytorch_to_canonical", "canonical_to_detectron_pytorch"]

# Names only Detectron.pytorch uses (its ResNet body, Conv_Body.conv_body.*, has our names).
_MARKERS = re.compile(r"^(Conv_Body\.conv_top|Conv_Body\.topdown_lateral_modules|Conv_Body\.posthoc_modules|"
                      r"RPN\.FPN_RPN_|RPN\.RPN_(conv|cls_score|bbox_pred)\.|Box_Head\.fc[12]?\.|Box_Head\.convs\.|"
                      r"Mask_Head\.conv_fcn\.|Mask_Head\.upconv|Mask_Outs\.classify\.|Keypoint_Head\.conv_fcn\.|"
                      r"Keypoint_Outs\.classify\.)")
# Names only maskrcnn uses (a GroupNorm body of ours also has norms without running statistics).
_OUR_MARKERS = re.compile(r"^(RPN\.head\.RPN_|Conv_Body\.fpn\.|Box_Head\.fc[67]\.|Box_Head\.head_conv|Mask_Head\.mask_fcn|"
                          r"Mask_Head\.conv5_mask\.|Mask_Outs\.mask_fcn_logits\.|Keypoint_Head\.conv_fcn\d|"
                          r"Keypoint_Outs\.kps_score_lowres\.)")

_AFFINE = {"weight": "scale", "bias": "shift"}  # AffineChannel2d parameters
_RPN = {"conv": "conv", "cls_score": "cls_logits", "bbox_pred": "bbox_pred"}
# Its FPN numbers lateral convs from res4 down (conv_top is res5's) and output convs from res5 down.
_LATERAL_LEVEL = {"0": "4", "1": "3", "2": "2"}
_OUTPUT_LEVEL = {"0": "5", "1": "4", "2": "3", "3": "2"}
_FC = {"1": "6", "2": "7"}
_SUB = r"(?:\.(?P<norm>[01]))?"  # GN variants are Sequential(conv, GroupNorm): index 0 the conv, 1 the norm
_NORM = {"": "", "0": "", "1": ".norm"}


def _resnet_rules(source: str, stage: str) -> Iterator[Rule]:
    """Rules for the ResNet blocks under ``source`` (a pattern ending in the stage), placed under ``stage``."""
    block = source + r"\.(?P<b>\d+)\."
    yield Rule(block + r"(?P<layer>conv[123]|downsample\.0)\.weight", stage + ".{b}.{layer}.weight")
    yield Rule(block + r"(?P<layer>bn[123]|downsample\.1)\." + PARAM, stage + ".{b}.{layer}.{p}", {"p": _AFFINE})
    yield Rule(block + r"gn(?P<i>[123])\." + PARAM, stage + ".{b}.bn{i}.{p}")


_BODY = r"Conv_Body\.(?:conv_body\.)?"


def _gn_conv_index(i: str) -> Optional[int]:
    return int(i) // 3 + 1 if int(i) % 3 == 0 else None


def _gn_norm_index(i: str) -> Optional[int]:
    return int(i) // 3 + 1 if int(i) % 3 == 1 else None


def _mark_gn_heads(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Its GN heads hold (conv, GroupNorm, ReLU) triples where the plain mask head holds (conv, ReLU) pairs under
    the same name: a GroupNorm at index 1 tells them apart, and such a head is renamed ``*_gn`` for the rules."""
    out = dict(sd)
    for head in ("Box_Head.convs", "Mask_Head.conv_fcn"):
        if f"{head}.1.weight" in sd:
            for k in [k for k in sd if isinstance(k, str) and k.startswith(head + ".")]:
                out[f"{head}_gn." + k[len(head) + 1:]] = out.pop(k)
    return out

#: Detectron.pytorch state-dict name -> canonical name. ``Mask_Head.res5`` goes to ``mask_res5`` here; whether it
#: is the box head's (shared) is decided afterwards.
TO_CANONICAL = RuleTable("this Detectron.pytorch file", "maskrcnn's model", [
    Rule(_BODY + r"res1\.conv1\.weight", "stem.conv1.weight"),
    Rule(_BODY + r"res1\.bn1\." + PARAM, "stem.bn1.{p}", {"p": _AFFINE}),
    Rule(_BODY + r"res1\.gn1\." + PARAM, "stem.bn1.{p}"),
    *_resnet_rules(_BODY + r"(?P<s>res[2-5])", "{s}"),
    *_resnet_rules(r"Box_Head\.res5", "res5"),
    *_resnet_rules(r"Mask_Head\.res5", "mask_res5"),
    Rule(r"Conv_Body\.conv_top" + _SUB + r"\." + PARAM, "fpn.lateral5{norm}.{p}", {"norm": _NORM}),
    Rule(r"Conv_Body\.topdown_lateral_modules\.(?P<i>\d+)\.conv_lateral" + _SUB + r"\." + PARAM,
         "fpn.lateral{i}{norm}.{p}", {"i": _LATERAL_LEVEL, "norm": _NORM}),
    Rule(r"Conv_Body\.posthoc_modules\.(?P<i>\d+)" + _SUB + r"\." + PARAM, "fpn.output{i}{norm}.{p}",
         {"i": _OUTPUT_LEVEL, "norm": _NORM}),
    Rule(r"RPN\.(?:FPN_)?RPN_(?P<layer>conv|cls_score|bbox_pred)\." + PARAM, "rpn.{layer}.{p}", {"layer": _RPN}),
    Rule(r"Box_Head\.fc(?P<i>[12])\." + PARAM, "box.fc{i}.{p}", {"i": _FC}),
    Rule(r"Box_Head\.fc\." + PARAM, "box.fc6.{p}"),
    # GN heads (renamed *_gn by _mark_gn_heads): Sequential(conv, GroupNorm, ReLU, conv, ...).
    Rule(r"Box_Head\.convs_gn\.(?P<i>\d+)\." + PARAM, "box.conv{i}.{p}", {"i": _gn_conv_index}),
    Rule(r"Box_Head\.convs_gn\.(?P<i>\d+)\." + PARAM, "box.conv{i}.norm.{p}", {"i": _gn_norm_index}),
    Rule(r"Mask_Head\.conv_fcn_gn\.(?P<i>\d+)\." + PARAM, "mask.fcn{i}.{p}", {"i": _gn_conv_index}),
    Rule(r"Mask_Head\.conv_fcn_gn\.(?P<i>\d+)\." + PARAM, "mask.fcn{i}.norm.{p}", {"i": _gn_norm_index}),
    Rule(r"Box_Outs\.(?P<layer>cls_score|bbox_pred)\." + PARAM, "box.{layer}.{p}"),
    # conv_fcn is Sequential(conv, ReLU, conv, ReLU, ...): the convs sit at even indices.
    Rule(r"Mask_Head\.conv_fcn\.(?P<i>\d+)\." + PARAM, "mask.fcn{i}.{p}",
         {"i": lambda i: int(i) // 2 + 1 if int(i) % 2 == 0 else None}),
    Rule(r"Mask_Head\.upconv5?\." + PARAM, "mask.conv5_mask.{p}"),
    Rule(r"Mask_Outs\.classify\." + PARAM, "mask.logits.{p}"),
    # Keypoint_Head.conv_fcn is Sequential(conv, ReLU, ...) as the mask head's; Keypoint_Outs.classify is the deconv
    # kps_score_lowres, and its upsample.upconv the fixed bilinear kernel (ours upsamples itself).
    Rule(r"Keypoint_Head\.conv_fcn\.(?P<i>\d+)\." + PARAM, "kps.conv_fcn{i}.{p}",
         {"i": lambda i: int(i) // 2 + 1 if int(i) % 2 == 0 else None}),
    Rule(r"Keypoint_Outs\.classify\." + PARAM, "kps.score_lowres.{p}"),
    Rule(r"Keypoint_Outs\.upsample\.upconv\." + PARAM, None),
], hint="Keypoint heads with KRCNN.USE_DECONV and roi_Xconv1fc heads without GroupNorm are not supported.")

#: Canonical name -> Detectron.pytorch name (norms already folded to AffineChannel weight/bias). Context: ``body``
#: (``Conv_Body.conv_body.`` under FPN), ``res5`` (where res5 lives: the body or ``Box_Head.``), ``rpn``
#: (``FPN_`` under FPN) and ``upconv`` (the mask head's upsampling layer).
FROM_CANONICAL = RuleTable("the canonical weights", "Detectron.pytorch's names", [
    Rule(r"stem\.(?P<rest>.+)", "{body}res1.{rest}"),
    Rule(r"res5\.(?P<rest>.+)", "{res5}res5.{rest}"),
    Rule(r"(?P<s>res[2-4])\.(?P<rest>.+)", "{body}{s}.{rest}"),
    Rule(r"mask_res5\.(?P<rest>.+)", "Mask_Head.res5.{rest}"),
    Rule(r"fpn\.lateral5\." + PARAM, "Conv_Body.conv_top.{p}"),
    Rule(r"fpn\.lateral(?P<i>[2-4])\." + PARAM, "Conv_Body.topdown_lateral_modules.{i}.conv_lateral.{p}",
         {"i": inverse(_LATERAL_LEVEL)}),
    Rule(r"fpn\.output(?P<i>[2-5])\." + PARAM, "Conv_Body.posthoc_modules.{i}.{p}",
         {"i": inverse(_OUTPUT_LEVEL)}),
    Rule(r"rpn\.(?P<layer>conv|cls_logits|bbox_pred)\." + PARAM, "RPN.{rpn}RPN_{layer}.{p}",
         {"layer": inverse(_RPN)}),
    Rule(r"box\.fc(?P<i>[67])\." + PARAM, "Box_Head.fc{i}.{p}", {"i": inverse(_FC)}),
    Rule(r"box\.(?P<layer>cls_score|bbox_pred)\." + PARAM, "Box_Outs.{layer}.{p}"),
    Rule(r"mask\.fcn(?P<i>\d+)\." + PARAM, "Mask_Head.conv_fcn.{i}.{p}", {"i": lambda i: 2 * (int(i) - 1)}),
    Rule(r"mask\.conv5_mask\." + PARAM, "Mask_Head.{upconv}.{p}"),
    Rule(r"mask\.logits\." + PARAM, "Mask_Outs.classify.{p}"),
    Rule(r"kps\.conv_fcn(?P<i>\d+)\." + PARAM, "Keypoint_Head.conv_fcn.{i}.{p}", {"i": lambda i: 2 * (int(i) - 1)}),
    Rule(r"kps\.score_lowres\." + PARAM, "Keypoint_Outs.classify.{p}"),
])


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


def detectron_pytorch_to_canonical(obj: Any, mask_head_shares_res5: Optional[bool] = None
                                   ) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a Detectron.pytorch checkpoint (or its bare state dict) to canonical names.

    ``mask_head_shares_res5``: whether ``Mask_Head.res5`` is the box head's (v0upshare) or its own (v0up); None
    decides from the values (a shared module saves equal tensors twice). Returns ``(canonical, notes)``.
    """
    sd = _mark_gn_heads(unwrap_state_dict(obj))
    renamed, _ = TO_CANONICAL.apply(sd, convert=to_tensor)
    notes: List[str] = []
    mask_res5 = {k[len("Mask_Head."):]: v for k, v in sd.items() if k.startswith("Mask_Head.res5.")}
    if mask_res5:
        shared = mask_head_shares_res5
        if shared is None:
            box_res5 = {k[len("Box_Head."):]: v for k, v in sd.items() if k.startswith("Box_Head.res5.")}
            shared = box_res5.keys() == mask_res5.keys() and all(
                torch.equal(to_tensor(box_res5[k], k), to_tensor(v, k)) for k, v in mask_res5.items())
        if shared:
            renamed = {k: v for k, v in renamed.items() if not k.startswith("mask_res5.")}
            notes.append("Detectron.pytorch: Mask_Head.res5 is the box head's res5 (v0upshare); kept once.")
        else:
            notes.append("Detectron.pytorch: Mask_Head.res5 is the mask head's own res5 (v0up).")
    canonical = affine_channels_to_bn(renamed, "Detectron.pytorch")
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
    c4_res5 = not fpn and any(k.startswith("box.") for k in canonical) and not any(
        k.startswith("box.fc") for k in canonical)
    context = {"body": body, "res5": "Box_Head." if c4_res5 else body, "rpn": "FPN_" if fpn else "",
               "upconv": "upconv" if fpn else "upconv5"}
    out, _ = FROM_CANONICAL.apply(bn_to_affine_channels(canonical), context)
    if mask_head_shares_res5 and c4_res5 and "mask.conv5_mask.weight" in canonical and not any(
            k.startswith("mask_res5.") for k in canonical):
        for k in [k for k in out if k.startswith("Box_Head.res5.")]:
            out["Mask_Head." + k[len("Box_Head."):]] = out[k]
    return out
