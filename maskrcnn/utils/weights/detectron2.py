"""detectron2 model-zoo weights: ``.pkl`` (``{'model': {name: ndarray}, '__author__': ...}``) or ``.pth``
(``{'model': state_dict, ...}``) for the R-50/101 C4 and FPN Mask / Faster R-CNN.

Names (``detectron2/modeling/backbone/{resnet,fpn}.py``, ``proposal_generator/rpn.py``, ``roi_heads/*.py``)::

    backbone.bottom_up.stem.conv1.weight  backbone.bottom_up.stem.conv1.norm.*       FPN models
    backbone.stem.conv1.*                                                          C4 models (no bottom_up)
    ...res{s}.{b}.conv{1,2,3}.weight  .conv{i}.norm.{weight,bias,running_mean,running_var}
    ...res{s}.{b}.shortcut.weight  .shortcut.norm.*                                projection shortcut
    backbone.fpn_lateral{2..5}.*  backbone.fpn_output{2..5}.*                      (GN: .norm.*)
    proposal_generator.rpn_head.conv.*  .objectness_logits.*  .anchor_deltas.*
    roi_heads.box_head.fc1.* fc2.*    roi_heads.res5.{b}.*  (C4 box head)
    roi_heads.box_head.conv{1..4}.weight  .conv{i}.norm.{weight,bias}  .fc1.*      GN box head (4conv1fc, no conv bias)
    roi_heads.box_predictor.cls_score.*   K+1 rows, background LAST (row K)
    roi_heads.box_predictor.bbox_pred.*   4K rows, foreground classes only (no background deltas)
    roi_heads.mask_head.mask_fcn{1..4}.*  .deconv.*  .predictor.*     predictor: K channels, no background
    roi_heads.mask_head.mask_fcn{i}.norm.{weight,bias}                GN mask head
    roi_heads.keypoint_head.conv_fcn{1..8}.*  .score_lowres.*       keypoint head (KRCNNConvDeconvUpsampleHead)
    roi_heads.box_head.{k}.fc{1,2}.*  roi_heads.box_predictor.{k}.*   Cascade R-CNN stage k (class-agnostic bbox_pred:
                                                                        4 rows) -> canonical box.stage{k}.*

Conversion to the canonical (Detectron) layout: the background row of ``cls_score`` moves from last to first; the
background's 4 ``bbox_pred`` rows and 1 mask channel are added as zeros (inference never reads them, and a
fine-tuning start re-learns them); the single-level RPN's anchors are reordered from detectron2's size-major to
Detectron's ratio-major order. ``pixel_mean``/``pixel_std`` buffers (older files) and anchor buffers are dropped.
The MSRA-initialised zoo models take BGR 0..255 minus ``[103.53, 116.28, 123.675]`` (std 1), put the block stride
in the 1x1 conv, use ``aligned=True`` RoIAlign (ROIAlignV2) and no "+1" in boxes.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .common import BN_BUFFERS, WeightsConversionError, to_tensor, unwrap_state_dict
from .rules import PARAM, Rule, RuleTable, inverse

__all__ = ["is_detectron2", "detectron2_to_canonical", "canonical_to_detectron2", "reorder_anchor_channels"]

_NORM_BUFFER = r"(?P<p>" + "|".join(BN_BUFFERS) + ")"
_HEADS = {
    "proposal_generator.rpn_head.conv": "rpn.conv",
    "proposal_generator.rpn_head.objectness_logits": "rpn.cls_logits",
    "proposal_generator.rpn_head.anchor_deltas": "rpn.bbox_pred",
    "roi_heads.box_head.fc1": "box.fc6", "roi_heads.box_head.fc2": "box.fc7",
    "roi_heads.box_predictor.cls_score": "box.cls_score", "roi_heads.box_predictor.bbox_pred": "box.bbox_pred",
    "roi_heads.mask_head.deconv": "mask.conv5_mask", "roi_heads.mask_head.predictor": "mask.logits",
    "roi_heads.keypoint_head.score_lowres": "kps.score_lowres",
}
_HEAD_PATTERN = r"(?P<layer>" + "|".join(k.replace(".", r"\.") for k in _HEADS) + r")\." + PARAM
_BODY = r"backbone\.(?:bottom_up\.)?"  # FPN models wrap the ResNet in bottom_up
_CASCADE_FC = {"fc1": "fc6", "fc2": "fc7"}


def _resnet_rules(source: str, stage: str) -> Iterator[Rule]:
    """detectron2's ResNet blocks under ``source`` (a pattern ending in the stage) -> canonical ``stage``: conv
    ``i`` carries norm ``i``, and the projection shortcut is ``shortcut`` (+ ``.norm``)."""
    block = source + r"\.(?P<b>\d+)\."
    yield Rule(block + r"conv(?P<i>[123])\.weight", stage + ".{b}.conv{i}.weight")
    yield Rule(block + r"conv(?P<i>[123])\.norm\." + _NORM_BUFFER, stage + ".{b}.bn{i}.{p}")
    yield Rule(block + r"shortcut\.weight", stage + ".{b}.downsample.0.weight")
    yield Rule(block + r"shortcut\.norm\." + _NORM_BUFFER, stage + ".{b}.downsample.1.{p}")


def _resnet_rules_back(source: str, stage: str) -> Iterator[Rule]:
    """Inverse of :func:`_resnet_rules`: canonical blocks under ``source`` -> detectron2's ``stage``."""
    block = source + r"\.(?P<b>\d+)\."
    yield Rule(block + r"conv(?P<i>[123])\.weight", stage + ".{b}.conv{i}.weight")
    yield Rule(block + r"bn(?P<i>[123])\." + _NORM_BUFFER, stage + ".{b}.conv{i}.norm.{p}")
    yield Rule(block + r"downsample\.0\.weight", stage + ".{b}.shortcut.weight")
    yield Rule(block + r"downsample\.1\." + _NORM_BUFFER, stage + ".{b}.shortcut.norm.{p}")


#: detectron2 state-dict name -> canonical name.
TO_CANONICAL = RuleTable("this detectron2 file", "maskrcnn's model", [
    Rule(r"pixel_(?:mean|std)|.*num_batches_tracked|proposal_generator\.anchor_generator\..*", None),
    Rule(_BODY + r"stem\.conv1\.weight", "stem.conv1.weight"),
    Rule(_BODY + r"stem\.conv1\.norm\." + _NORM_BUFFER, "stem.bn1.{p}"),
    *_resnet_rules(_BODY + r"(?P<s>res[2-5])", "{s}"),
    *_resnet_rules(r"roi_heads\.res5", "res5"),
    Rule(r"backbone\.fpn_(?P<kind>lateral|output)(?P<L>[2-6])(?P<norm>\.norm)?\." + PARAM, "fpn.{kind}{L}{norm}.{p}"),
    Rule(r"roi_heads\.mask_head\.mask_fcn(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM, "mask.fcn{i}{norm}.{p}"),
    Rule(r"roi_heads\.box_head\.conv(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM, "box.conv{i}{norm}.{p}"),
    Rule(r"roi_heads\.keypoint_head\.conv_fcn(?P<i>\d+)\." + PARAM, "kps.conv_fcn{i}.{p}"),
    Rule(_HEAD_PATTERN, "{layer}.{p}", {"layer": _HEADS}),
    # Cascade R-CNN: one box head and predictor per stage.
    Rule(r"roi_heads\.box_head\.(?P<k>\d+)\.(?P<layer>fc1|fc2)\." + PARAM, "box.stage{k}.{layer}.{p}",
         {"layer": _CASCADE_FC}),
    Rule(r"roi_heads\.box_head\.(?P<k>\d+)\.conv(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM,
         "box.stage{k}.conv{i}{norm}.{p}"),
    Rule(r"roi_heads\.box_predictor\.(?P<k>\d+)\.(?P<layer>cls_score|bbox_pred)\." + PARAM,
         "box.stage{k}.{layer}.{p}"),
], hint="RetinaNet and other non-standard detectron2 models are not supported.")

#: Canonical name -> detectron2 name. Context: ``body`` (``backbone.bottom_up.`` under FPN, else ``backbone.``) and
#: ``res5`` (``roi_heads.`` when res5 is the C4 box head, else ``body``).
FROM_CANONICAL = RuleTable("the canonical weights", "detectron2's names", [
    Rule(r"stem\.conv1\.weight", "{body}stem.conv1.weight"),
    Rule(r"stem\.bn1\." + _NORM_BUFFER, "{body}stem.conv1.norm.{p}"),
    *_resnet_rules_back(r"(?P<s>res[2-4])", "{body}{s}"),
    *_resnet_rules_back(r"res5", "{res5}res5"),
    Rule(r"fpn\.(?P<kind>lateral|output)(?P<L>[2-6])(?P<norm>\.norm)?\." + PARAM, "backbone.fpn_{kind}{L}{norm}.{p}"),
    Rule(r"mask\.fcn(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM, "roi_heads.mask_head.mask_fcn{i}{norm}.{p}"),
    Rule(r"box\.conv(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM, "roi_heads.box_head.conv{i}{norm}.{p}"),
    Rule(r"kps\.conv_fcn(?P<i>\d+)\." + PARAM, "roi_heads.keypoint_head.conv_fcn{i}.{p}"),
    Rule(r"box\.stage(?P<k>\d+)\.(?P<layer>fc6|fc7)\." + PARAM, "roi_heads.box_head.{k}.{layer}.{p}",
         {"layer": inverse(_CASCADE_FC)}),
    Rule(r"box\.stage(?P<k>\d+)\.conv(?P<i>\d+)(?P<norm>\.norm)?\." + PARAM,
         "roi_heads.box_head.{k}.conv{i}{norm}.{p}"),
    Rule(r"box\.stage(?P<k>\d+)\.(?P<layer>cls_score|bbox_pred)\." + PARAM, "roi_heads.box_predictor.{k}.{layer}.{p}"),
    Rule(r"(?P<layer>\w+\.\w+)\." + PARAM, "{layer}.{p}", {"layer": inverse(_HEADS)}),
])


def is_detectron2(obj: Any) -> bool:
    """True for a detectron2 checkpoint (``__author__`` marker or its module names)."""
    if isinstance(obj, Mapping) and "model" in obj and "__author__" in obj:
        return True
    try:
        sd = unwrap_state_dict(obj)
    except WeightsConversionError:
        return False
    return any(isinstance(k, str) and (k.startswith("backbone.bottom_up.") or k.startswith("backbone.stem.")
                                       or k.startswith("proposal_generator.")) for k in sd)


def reorder_anchor_channels(t: Tensor, num_sizes: int, num_ratios: int, per_anchor: int,
                            size_major_to_ratio_major: bool = True) -> Tensor:
    """Permute the anchor axis of an RPN output layer's weight or bias (dim 0 = ``A * per_anchor``) between
    detectron2's size-major anchor order (``a = size * R + ratio``) and Detectron's / torchvision's ratio-major
    order (``a = ratio * S + size``)."""
    a = num_sizes * num_ratios
    if t.shape[0] != a * per_anchor:
        raise WeightsConversionError(f"RPN layer with {t.shape[0]} outputs does not fit {num_sizes} sizes x "
                                     f"{num_ratios} ratios x {per_anchor}")
    shape = (num_sizes, num_ratios) if size_major_to_ratio_major else (num_ratios, num_sizes)
    grid = t.reshape(*shape, per_anchor, *t.shape[1:])
    return grid.transpose(0, 1).reshape(t.shape).contiguous()




def detectron2_to_canonical(obj: Any, anchor_grid: Optional[Tuple[int, int]] = None
                            ) -> Tuple[Dict[str, Tensor], List[str]]:
    """Map a detectron2 checkpoint to canonical names and Detectron's class/anchor layouts.

    Args:
        anchor_grid: ``(num_sizes, num_ratios)`` of a single-level (C4) RPN; None means detectron2's default
            (5 sizes x 3 ratios) when the RPN has 15 anchors. FPN RPNs (one size per level) need no reordering.
    Returns ``(canonical, notes)``.
    """
    sd = unwrap_state_dict(obj)
    pixel = {name: [round(float(x), 4) for x in np.asarray(to_tensor(sd[name], name)).reshape(-1)]
             for name in ("pixel_mean", "pixel_std") if name in sd}
    canonical, dropped = TO_CANONICAL.apply(sd, convert=to_tensor)
    notes: List[str] = []
    _fix_norms(canonical)
    _to_detectron_classes(canonical, notes)
    _to_detectron_anchors(canonical, anchor_grid, notes)
    if dropped:
        notes.append(f"detectron2: dropped {len(dropped)} non-weight buffer(s) (pixel_mean/pixel_std, anchors, "
                     "counters).")
    if pixel:
        notes.append("detectron2: the file's own normalisation: " +
                     ", ".join(f"{k}={v}" for k, v in sorted(pixel.items())) + ".")
    return canonical, notes


def _fix_norms(canonical: Dict[str, Tensor]) -> None:
    """detectron2 FrozenBN files without statistics are read by detectron2 with mean 0, var 1 (its version-1
    upgrade); GN norms have weight/bias only and stay so."""
    heads = {k.rsplit(".", 1)[0] for k in canonical if re.search(r"\.(bn\d|downsample\.1)\.\w+$", k)}
    for head in heads:
        if f"{head}.running_mean" in canonical or f"{head}.running_var" in canonical:
            w = canonical[f"{head}.weight"]
            canonical.setdefault(f"{head}.running_mean", torch.zeros_like(w))
            canonical.setdefault(f"{head}.running_var", torch.ones_like(w))


def _box_predictors(canonical: Mapping[str, Tensor]) -> List[str]:
    """``box`` and the cascade stages ``box.stage{k}`` that have a ``cls_score``."""
    return sorted({k[: -len(".cls_score.weight")] for k in canonical
                   if re.fullmatch(r"box(\.stage\d+)?\.cls_score\.weight", k)})


def _to_detectron_classes(canonical: Dict[str, Tensor], notes: List[str]) -> None:
    num_fg = None
    for pred in _box_predictors(canonical):
        for what in ("weight", "bias"):
            key = f"{pred}.cls_score.{what}"
            if key in canonical:
                t = canonical[key]
                canonical[key] = torch.cat([t[-1:], t[:-1]]).contiguous()
        num_fg = canonical[f"{pred}.cls_score.weight"].shape[0] - 1
        for what in ("weight", "bias"):
            key = f"{pred}.bbox_pred.{what}"
            # Class-specific (4K rows) or class-agnostic (4 rows) deltas: Detectron's layouts have 4(K+1) and 8.
            if key in canonical and canonical[key].shape[0] in (4 * num_fg, 4):
                t = canonical[key]
                canonical[key] = torch.cat([torch.zeros_like(t[:4]), t]).contiguous()
    for what in ("weight", "bias"):
        key = f"mask.logits.{what}"
        if key in canonical and num_fg is not None and canonical[key].shape[0] == num_fg:
            t = canonical[key]
            canonical[key] = torch.cat([torch.zeros_like(t[:1]), t]).contiguous()
    if num_fg is not None:
        notes.append(f"detectron2: {num_fg} classes; cls_score's background row moved from last to first, zero "
                     "background rows added to bbox_pred and the mask predictor (class-specific layers).")


def _to_detectron_anchors(canonical: Dict[str, Tensor], anchor_grid: Optional[Tuple[int, int]],
                          notes: List[str]) -> None:
    cls = canonical.get("rpn.cls_logits.weight")
    if cls is None:
        return
    num_anchors = cls.shape[0]
    if anchor_grid is None:
        if any(k.startswith("fpn.") for k in canonical) or num_anchors in (1, 3):
            return
        if num_anchors != 15:
            raise WeightsConversionError(
                f"detectron2 single-level RPN with {num_anchors} anchors: pass anchor_grid=(num_sizes, num_ratios) "
                "(a config with RPN.SIZES and RPN.ASPECT_RATIOS) so that its anchors can be reordered")
        anchor_grid = (5, 3)
    sizes, ratios = anchor_grid
    if sizes * ratios != num_anchors:
        raise WeightsConversionError(f"detectron2 RPN has {num_anchors} anchors per location, but the config has "
                                     f"{sizes} sizes x {ratios} aspect ratios")
    if sizes == 1 or ratios == 1:
        return
    for layer, per in (("rpn.cls_logits", 1), ("rpn.bbox_pred", 4)):
        for what in ("weight", "bias"):
            key = f"{layer}.{what}"
            canonical[key] = reorder_anchor_channels(canonical[key], sizes, ratios, per)
    notes.append(f"detectron2: RPN anchors reordered from size-major to ratio-major ({sizes} sizes x {ratios} "
                 "ratios).")


def canonical_to_detectron2(canonical: Mapping[str, Tensor], anchor_grid: Optional[Tuple[int, int]] = None
                            ) -> Dict[str, Tensor]:
    """Inverse of :func:`detectron2_to_canonical` (drops the background rows the forward direction adds)."""
    fpn = any(k.startswith("fpn.") for k in canonical)
    body = "backbone.bottom_up." if fpn else "backbone."
    c4_res5 = not fpn and "box.fc6.weight" not in canonical and "box.stage0.fc6.weight" not in canonical
    layouts: Dict[str, Tensor] = OrderedDict()
    for key, t in canonical.items():
        head = key.rpartition(".")[0]
        if re.fullmatch(r"box(\.stage\d+)?\.cls_score", head):
            t = torch.cat([t[1:], t[:1]])
        elif re.fullmatch(r"box(\.stage\d+)?\.bbox_pred", head):
            t = t[4:]
        elif head == "mask.logits" and t.shape[0] > 1:
            t = t[1:]
        elif head in ("rpn.cls_logits", "rpn.bbox_pred") and anchor_grid is not None:
            sizes, ratios = anchor_grid
            t = reorder_anchor_channels(t, sizes, ratios, 1 if head == "rpn.cls_logits" else 4,
                                        size_major_to_ratio_major=False)
        layouts[key] = t.contiguous()
    out, _ = FROM_CANONICAL.apply(layouts, {"body": body, "res5": "roi_heads." if c4_res5 else body})
    return out
