"""What a converted weight set expects from the config: the per-format pre-processing and box conventions
(:data:`FORMAT_CFG_HINTS`), the architecture read off the canonical tensors (:func:`describe_canonical`), and the
notes that compare both with a config (:func:`cfg_hint_notes`)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

from torch import Tensor

__all__ = ["FORMAT_CFG_HINTS", "describe_canonical", "cfg_hint_notes"]

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
    # The pixel statistics of detectron2's MSRA-initialised zoo models (BGR); its files do not record them.
    "detectron2": {"PIXEL_ORDER": "BGR", "PIXEL_SCALE": 255.0, "PIXEL_MEANS": [103.53, 116.28, 123.675],
                   "PIXEL_STDS": [1.0, 1.0, 1.0], "MODEL.LEGACY_PLUS_ONE": False, "RESNETS.STRIDE_1X1": True,
                   "FAST_RCNN.ROI_XFORM_ALIGNED": True, "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO": 0,
                   "MRCNN.ROI_XFORM_SAMPLING_RATIO": 0, "RESIZE_METHOD": "detectron2", "RPN.ROUND_ANCHORS": False,
                   "RPN.MIN_SIZE_STRICT": True, "RPN.NMS_ON_LOGITS": True, "TEST.MASK_PASTE_METHOD": "detectron2",
                   "TEST.DETECTOR_POSTPROCESS": "detectron2"},
}


#: Hints a format's files do not record, so a config that differs from them is not flagged: detectron2 models are
#: trained with BGR (MSRA-initialised zoo models) or RGB (torchvision-initialised) input, and the file does not say.
_UNRECORDED = {"detectron2": ("PIXEL_ORDER", "PIXEL_SCALE", "PIXEL_MEANS", "PIXEL_STDS")}

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
    kps = canonical.get("kps.score_lowres.weight")
    # ConvTranspose2d weight: (in, out, k, k); anything else says nothing about the keypoint count.
    info["keypoints"] = int(kps.shape[1]) if kps is not None and kps.dim() == 4 else None
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
                        + (", masks" if info.get("mask") else ", no masks")
                        + (f", {info['keypoints']} keypoints" if info.get("keypoints") else ""))
        if arch:
            notes.append(f"{fmt} weights: " + ", ".join(arch) + ".")
    want = ", ".join(f"{k} {v}" for k, v in hints.items())
    notes.append(f"{fmt} weights expect: {want}.")
    if cfg is not None:
        bad = []
        for key, value in hints.items():
            if key in _UNRECORDED.get(fmt, ()):
                continue
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
        if info is not None and info.get("keypoints") and (not cfg.MODEL.KEYPOINTS_ON or
                                                           int(cfg.KRCNN.NUM_KEYPOINTS) != info["keypoints"]):
            notes.append(f"WARNING: the weights have a keypoint head with {info['keypoints']} keypoints: set "
                         f"MODEL.KEYPOINTS_ON True and KRCNN.NUM_KEYPOINTS {info['keypoints']} to use it.")
    return notes

