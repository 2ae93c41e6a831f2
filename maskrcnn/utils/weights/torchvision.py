"""torchvision weights: ``maskrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn`` / ``keypointrcnn_resnet50_fpn`` (v1)
detection state dicts and the
ImageNet ``resnet*`` / ``resnext*`` / ``wide_resnet*`` classification state dicts (backbone initialisation).

Names (``torchvision/models/detection/{mask_rcnn,faster_rcnn,rpn}.py``, ``ops/feature_pyramid_network.py``,
``models/resnet.py``)::

    backbone.body.conv1.weight  backbone.body.bn1.*            stem (ImageNet files: conv1.*, bn1.* without prefix)
    backbone.body.layer{1..4}.{b}.conv{1,2,3}.weight  .bn{1,2,3}.*  .downsample.{0,1}.*   = res2..res5
    backbone.fpn.inner_blocks.{i}.0.*  backbone.fpn.layer_blocks.{i}.0.*      i = 0..3 -> P2..P5 (finest first)
    rpn.head.conv.0.0.*  rpn.head.cls_logits.*  rpn.head.bbox_pred.*
    roi_heads.box_head.fc6.*  fc7.*   roi_heads.box_predictor.cls_score.*  bbox_pred.*      (class 0 = background)
    roi_heads.mask_head.{0..3}.0.*    roi_heads.mask_predictor.conv5_mask.*  mask_fcn_logits.*
    roi_heads.keypoint_head.{0,2,..,14}.*  (conv i+1 at index 2i: Sequential of conv, ReLU)
    roi_heads.keypoint_predictor.kps_score_lowres.*

Files saved before torchvision 0.13 use ``inner_blocks.{i}.*``, ``rpn.head.conv.*`` and ``mask_head.mask_fcn{k}.*``
(torchvision upgrades them in ``_load_from_state_dict``); both spellings are read. Norm layers are FrozenBN (four
buffers) or BatchNorm2d (plus ``num_batches_tracked``, dropped); torchvision's FrozenBN eps is 1e-5. ImageNet
classifiers (``fc.*``) are dropped. torchvision models take RGB in [0, 1] normalised by the ImageNet mean/std, and put
the block stride in the 3x3 conv.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from .common import WeightsConversionError, check_bn_complete, to_tensor, unwrap_state_dict
from .rules import PARAM, Rule, RuleTable, inverse, plus

__all__ = ["is_torchvision", "torchvision_to_canonical", "canonical_to_torchvision"]

_BODY = r"(?:backbone\.body\.)?"
_NORM_BUFFER = r"(?P<p>weight|bias|running_mean|running_var)"
_HEADS = {  # torchvision module -> canonical layer, for the layers both name alike apart from the prefix
    "rpn.head.cls_logits": "rpn.cls_logits", "rpn.head.bbox_pred": "rpn.bbox_pred",
    "roi_heads.box_head.fc6": "box.fc6", "roi_heads.box_head.fc7": "box.fc7",
    "roi_heads.box_predictor.cls_score": "box.cls_score", "roi_heads.box_predictor.bbox_pred": "box.bbox_pred",
    "roi_heads.mask_predictor.conv5_mask": "mask.conv5_mask",
    "roi_heads.mask_predictor.mask_fcn_logits": "mask.logits",
    "roi_heads.keypoint_predictor.kps_score_lowres": "kps.score_lowres",
}
_HEAD_PATTERN = r"(?P<layer>" + "|".join(k.replace(".", r"\.") for k in _HEADS) + r")\." + PARAM

#: torchvision state-dict name -> canonical name.
TO_CANONICAL = RuleTable("this torchvision file", "maskrcnn's model", [
    Rule(r".*num_batches_tracked", None),  # BatchNorm2d counters
    Rule(r"fc\.(?:weight|bias)", None),  # the ImageNet classifier
    Rule(_BODY + r"conv1\.weight", "stem.conv1.weight"),
    Rule(_BODY + r"bn1\." + _NORM_BUFFER, "stem.bn1.{p}"),
    Rule(_BODY + r"layer(?P<s>[1-4])\.(?P<b>\d+)\.(?P<layer>conv[123]|downsample\.0)\.weight",
         "res{s}.{b}.{layer}.weight", {"s": plus(1)}),
    Rule(_BODY + r"layer(?P<s>[1-4])\.(?P<b>\d+)\.(?P<layer>bn[123]|downsample\.1)\." + _NORM_BUFFER,
         "res{s}.{b}.{layer}.{p}", {"s": plus(1)}),
    # Before torchvision 0.13: inner_blocks.{i}.*, rpn.head.conv.*, mask_head.mask_fcn{k}.*
    Rule(r"backbone\.fpn\.inner_blocks\.(?P<i>\d+)(?:\.0)?\." + PARAM, "fpn.lateral{i}.{p}", {"i": plus(2)}),
    Rule(r"backbone\.fpn\.layer_blocks\.(?P<i>\d+)(?:\.0)?\." + PARAM, "fpn.output{i}.{p}", {"i": plus(2)}),
    Rule(r"rpn\.head\.conv(?:\.0\.0)?\." + PARAM, "rpn.conv.{p}"),
    Rule(r"roi_heads\.mask_head\.(?P<i>\d+)\.0\." + PARAM, "mask.fcn{i}.{p}", {"i": plus(1)}),
    Rule(r"roi_heads\.mask_head\.mask_fcn(?P<i>\d+)\." + PARAM, "mask.fcn{i}.{p}"),
    Rule(r"roi_heads\.keypoint_head\.(?P<i>\d+)\." + PARAM, "kps.conv_fcn{i}.{p}", {"i": lambda v: str(int(v) // 2 + 1)}),
    Rule(_HEAD_PATTERN, "{layer}.{p}", {"layer": _HEADS}),
], hint="Only the v1 maskrcnn/fasterrcnn/keypointrcnn_resnet50_fpn models and ImageNet ResNet/ResNeXt classifiers are supported "
        "(not the *_v2 models, whose heads differ).")

#: Canonical name -> current torchvision name; context ``body`` is ``backbone.body.`` or "" (ImageNet files).
FROM_CANONICAL = RuleTable("the canonical weights", "torchvision's names", [
    Rule(r"stem\.(?P<rest>.+)", "{body}{rest}"),
    Rule(r"res(?P<s>[2-5])\.(?P<rest>.+)", "{body}layer{s}.{rest}", {"s": plus(-1)}),
    Rule(r"fpn\.lateral(?P<i>[2-5])\." + PARAM, "backbone.fpn.inner_blocks.{i}.0.{p}", {"i": plus(-2)}),
    Rule(r"fpn\.output(?P<i>[2-5])\." + PARAM, "backbone.fpn.layer_blocks.{i}.0.{p}", {"i": plus(-2)}),
    Rule(r"rpn\.conv\." + PARAM, "rpn.head.conv.0.0.{p}"),
    Rule(r"mask\.fcn(?P<i>\d+)\." + PARAM, "roi_heads.mask_head.{i}.0.{p}", {"i": plus(-1)}),
    Rule(r"kps\.conv_fcn(?P<i>\d+)\." + PARAM, "roi_heads.keypoint_head.{i}.{p}", {"i": lambda v: str(2 * (int(v) - 1))}),
    Rule(r"(?P<layer>\w+\.\w+)\." + PARAM, "{layer}.{p}", {"layer": inverse(_HEADS)}),
])


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
    canonical, dropped = TO_CANONICAL.apply(unwrap_state_dict(obj), convert=to_tensor)
    check_bn_complete(canonical, "torchvision")
    notes: List[str] = []
    counters = sum(name.endswith("num_batches_tracked") for name in dropped)
    if counters:
        notes.append(f"torchvision: dropped {counters} BatchNorm num_batches_tracked counter(s).")
    if counters < len(dropped):
        notes.append("torchvision: ImageNet classification file; the classifier (fc) was dropped, backbone only.")
    return canonical, notes


def canonical_to_torchvision(canonical: Mapping[str, Tensor], imagenet: bool = False) -> Dict[str, Tensor]:
    """Inverse of :func:`torchvision_to_canonical` with current torchvision names (FrozenBN keys)."""
    out, _ = FROM_CANONICAL.apply(canonical, {"body": "" if imagenet else "backbone.body."})
    return out
