"""The canonical weight layout and the tensor helpers every converter shares.

Every source format (``detectron``, ``detectron.pytorch``, ``torchvision``, ``detectron2``) is first turned into one
*canonical* dict of float32 CPU tensors with Detectron's semantics;
:func:`maskrcnn.utils.weights.ours.canonical_to_ours` then places it in our module tree. One mapping per format plus
one placement keeps the formats independent of each other and of our module names (which live in
:data:`maskrcnn.utils.weights.ours.OUR_NAMES` only).

Canonical keys (``s`` = stage 2..5, ``b`` = block index, ``L`` = pyramid level 2..5)::

    stem.conv1.weight                 stem.bn1.{weight,bias[,running_mean,running_var]}
    res{s}.{b}.conv{1,2,3}.weight     res{s}.{b}.bn{1,2,3}.{...}      (basic blocks: conv1, conv2)
    res{s}.{b}.downsample.0.weight    res{s}.{b}.downsample.1.{...}
    mask_res5.{b}.<as above>          the C4 mask head's own res5 (Detectron's v0up), when it has one
    fpn.lateral{L}.{weight,bias}      fpn.output{L}.{weight,bias}     (+ .norm.{weight,bias} with GroupNorm)
    rpn.conv.*  rpn.cls_logits.*  rpn.bbox_pred.*                     (anchors in Detectron's ratio-major order)
    box.fc6.*  box.fc7.*  box.cls_score.*  box.bbox_pred.*            (class 0 = background; 4 deltas per class)
    mask.fcn{i}.*  mask.conv5_mask.*  mask.logits.*                   (channel 0 = background)
    kps.conv_fcn{i}.*  kps.score_lowres.*                             (keypoint head convs, heatmap deconv)

Stage 5 is always ``res5`` whether it belongs to the body (FPN, conv5 bodies) or to the C4 box head, as in Detectron;
the placement decides. A norm entry with four tensors is a batch norm ``y = (x - mean) / sqrt(var + 1e-5) * w + b``
(:data:`CANONICAL_BN_EPS`); Caffe2's AffineChannel ``y = x * s + b`` becomes mean 0, var ``1 - eps`` so the scale
is exactly ``s``. A norm entry with only ``weight``/``bias`` is a GroupNorm. While a converter renames, an
AffineChannel is written as ``<norm>.scale`` / ``<norm>.shift`` and :func:`affine_channels_to_bn` turns the pair into
the batch-norm entry.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CANONICAL_BN_EPS", "BN_BUFFERS", "WeightsConversionError", "to_tensor", "affine_to_bn", "affine_channels_to_bn",
    "bn_to_affine_channels", "check_bn_complete", "flip_conv1_channels", "unwrap_state_dict", "raise_unmapped",
]

#: eps of the canonical batch norm, equal to our ``FrozenBatchNorm2d``'s and torchvision's/detectron2's.
CANONICAL_BN_EPS = 1e-5

#: The four tensors of a canonical batch norm.
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# A canonical ResNet norm layer (stem, block or shortcut norm), not an FPN GroupNorm.
_RESNET_NORM_RE = re.compile(r"^(.+\.(?:bn\d|downsample\.1))\.(\w+)$")


class WeightsConversionError(ValueError):
    """A weight file does not fit the requested conversion (unknown tensors, wrong shapes, unsupported layout)."""


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


def affine_channels_to_bn(renamed: Mapping[str, Tensor], fmt: str) -> "OrderedDict[str, Tensor]":
    """Replace every ``<norm>.scale`` / ``<norm>.shift`` pair (an AffineChannel, as the converters write it) by the
    canonical batch norm with the same output, where the pair first appears. A lone scale or shift is an error
    naming the norm."""
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, t in renamed.items():
        head, _, what = key.rpartition(".")
        if what not in ("scale", "shift"):
            out[key] = t
            continue
        if f"{head}.weight" in out:
            continue  # the pair was converted at its first member
        scale, shift = renamed.get(f"{head}.scale"), renamed.get(f"{head}.shift")
        if scale is None or shift is None:
            raise WeightsConversionError(f"{fmt} norm {head!r} has only its {what}: an AffineChannel needs both its "
                                         "scale and its shift (the file is incomplete)")
        for k, v in affine_to_bn(scale, shift).items():
            out[f"{head}.{k}"] = v
    return out


def bn_to_affine_channels(canonical: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """The ResNet norms of ``canonical`` as AffineChannel ``weight`` (scale) and ``bias`` (shift) only: a batch norm's
    statistics are folded in (``scale = w / sqrt(var + eps)``, ``shift = b - mean * scale``). Inverse of
    :func:`affine_channels_to_bn` for the formats that store AffineChannels (Detectron, Detectron.pytorch)."""
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, t in canonical.items():
        m = _RESNET_NORM_RE.match(key)
        if m is None:
            out[key] = t
            continue
        head = m.group(1)
        if f"{head}.weight" in out:
            continue
        w, b = canonical[f"{head}.weight"], canonical[f"{head}.bias"]
        mean, var = canonical.get(f"{head}.running_mean"), canonical.get(f"{head}.running_var")
        if mean is not None and var is not None:
            scale = w / (var + CANONICAL_BN_EPS).sqrt()
            w, b = scale, b - mean * scale
        out[f"{head}.weight"], out[f"{head}.bias"] = w, b
    return out


def check_bn_complete(canonical: Mapping[str, Tensor], fmt: str) -> None:
    """Every ResNet norm of a format that stores batch norms has all of :data:`BN_BUFFERS`."""
    heads = {m.group(1) for m in map(_RESNET_NORM_RE.match, canonical) if m}
    for head in sorted(heads):
        missing = [b for b in BN_BUFFERS if f"{head}.{b}" not in canonical]
        if missing:
            raise WeightsConversionError(f"{fmt} norm {head!r} lacks {missing}")


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


def raise_unmapped(source: str, target: str, names: Iterable[str], hint: str = "") -> None:
    """Raise :class:`WeightsConversionError` listing ``names`` (the first 20), if there are any."""
    names = sorted(names)
    if names:
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        raise WeightsConversionError(f"{len(names)} tensor(s) of {source} have no counterpart in {target}: {shown}."
                                     + (f" {hint}" if hint else ""))
