"""Speed features, applied to a built model: every one keeps the model's results (up to float rounding, or within
the documented bf16 tolerance) and is switched by a config key.

Inference (:func:`prepare_for_inference`, keys under ``TEST``):

* ``FUSE_FROZEN_BN``: fold every ``FrozenBatchNorm2d`` (and eval-mode ``BatchNorm2d``) into the convolution
  before it (backbone :func:`~maskrcnn.modeling.backbone.resnet.fuse_frozen_bn`); saves two elementwise passes
  per conv.
* ``FUSE_CONV_ACTIVATIONS``: on the CPU, run the folded ResNet blocks with oneDNN's fused primitives
  (conv + ReLU, and conv + residual add + ReLU in one pass) through :class:`FusedConv2d`; needs folded BN.
* ``CHANNELS_LAST``: convolution weights (and the body's input) in channels-last memory format, the layout
  oneDNN convolves in without reordering every activation.
* ``AMP``: ``'bf16'`` (CPU or CUDA) / ``'fp16'`` (CUDA) autocast around the whole forward, with fp32 islands where
  precision decides results: the RPN's objectness/box-delta convs and ``Box_Outs`` run in fp32 (so proposal ranking,
  box decoding, score thresholds and NMS see fp32 logits and deltas) and ``Mask_Outs``' logits are returned in
  fp32 before the sigmoid. Box coding, NMS and mask pasting are fp32 operations anyway.
* ``COMPILE``: ``torch.compile`` of ``Conv_Body`` (inductor, freezing on the CPU). Optional: compilation takes
  tens of seconds per input size, and the fused eager path reaches about the same speed.

Training (:func:`prepare_for_training`, keys under ``TRAIN``):

* ``FUSE_FROZEN_BN``: each (conv, ``FrozenBatchNorm2d``) pair becomes one convolution whose weight is scaled by the
  frozen BN on the fly (:class:`FrozenBNConv2d`). Gradients are those of the unfused pair; parameters, buffers and
  state-dict keys are unchanged (same ``Parameter`` objects, the BN keeps its buffers), so optimizers and
  checkpoints are unaffected.
* ``CHANNELS_LAST``: as for inference.

Every function edits the model in place and returns it. The oneDNN modules live in ``onednn_fusion.py`` and the
training fold in ``frozen_bn_training.py``; both are re-exported here.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..modeling.backbone.resnet import FrozenBatchNorm2d, fuse_frozen_bn
from .frozen_bn_training import (FoldedFrozenBatchNorm2d, FrozenBNConv2d, fold_frozen_bn_for_training,
                                 unfold_frozen_bn_for_training)
from .onednn_fusion import (FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedFPN, fuse_conv_activations,
                            onednn_fusion_available)

__all__ = [
    "AMP_DTYPES",
    "FP32_MODULES",
    "FP32_OUTPUT_MODULES",
    "FoldedFrozenBatchNorm2d",
    "FrozenBNConv2d",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConv2d",
    "FusedFPN",
    "SpeedHandle",
    "compile_conv_body",
    "enable_amp",
    "fold_frozen_bn",
    "fold_frozen_bn_for_training",
    "fuse_conv_activations",
    "onednn_fusion_available",
    "prepare_for_inference",
    "prepare_for_training",
    "to_channels_last",
    "unfold_frozen_bn_for_training",
]

logger = logging.getLogger("maskrcnn.speed")

AMP_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Sub-modules (dotted paths from the model) that run entirely in fp32 under autocast: their inputs are cast to
#: fp32 and autocast is off inside. They produce the logits and deltas that box decoding, score thresholds and NMS
#: rank, where bf16's 8-bit mantissa would create ties and shift boxes.
FP32_MODULES: Tuple[str, ...] = ("RPN.RPN_cls_score", "RPN.RPN_bbox_pred", "Box_Outs")
#: Sub-modules run under autocast whose floating outputs are cast back to fp32 (mask logits before the sigmoid).
FP32_OUTPUT_MODULES: Tuple[str, ...] = ("Mask_Outs",)


# --------------------------------------------------------------------------------------------------------------------
# Config access. Keys that a config may lack (an older saved config) take the default of maskrcnn.config.
def _cfg_value(cfg, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return _default(dotted)
        node = node[part]
    return node


def _default(dotted: str) -> Any:
    from ..config import get_cfg

    node = get_cfg()
    for part in dotted.split("."):
        node = node[part]
    return node


def _submodule(model: nn.Module, dotted: str) -> Optional[nn.Module]:
    obj: Any = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# Frozen BN folding (inference).
def _freeze_eval_batch_norms(module: nn.Module) -> None:
    # An nn.BatchNorm2d in eval mode is the affine map of its running statistics: a FrozenBatchNorm2d.
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d and not child.training and child.track_running_stats:
            setattr(module, name, FrozenBatchNorm2d.from_batch_norm(child))
        else:
            _freeze_eval_batch_norms(child)


def fold_frozen_bn(model: nn.Module) -> nn.Module:
    """Fold every ``FrozenBatchNorm2d`` (and every ``nn.BatchNorm2d`` in eval mode, e.g. a model trained with
    ``RESNETS.NORM: BN``) that follows a ``Conv2d`` into it, in place. Inference only: the folded parameters no
    longer match the checkpoint's names, and the BN becomes ``nn.Identity``."""
    # A model prepared for training computes its BN inside FrozenBNConv2d: undo that first, or it would be
    # folded twice.
    unfold_frozen_bn_for_training(model)
    _freeze_eval_batch_norms(model)
    return fuse_frozen_bn(model, inplace=True)


# --------------------------------------------------------------------------------------------------------------------
# Channels-last.
def _input_to_channels_last(module: nn.Module, args: tuple):
    if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert every 4-D parameter and buffer to channels-last, in place, and make ``model.Conv_Body`` (when there
    is one) take its input channels-last, so that every feature map downstream is channels-last too."""
    model.to(memory_format=torch.channels_last)
    body = getattr(model, "Conv_Body", None)
    if isinstance(body, nn.Module) and not getattr(body, "_speed_channels_last_hook", False):
        body.register_forward_pre_hook(_input_to_channels_last)
        body._speed_channels_last_hook = True
    return model


# --------------------------------------------------------------------------------------------------------------------
# Mixed precision with fp32 islands.
def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (list, tuple)):
        cast = [_cast_floats(o, dtype) for o in obj]
        return type(obj)(*cast) if hasattr(obj, "_fields") else type(obj)(cast)
    if isinstance(obj, dict):
        return type(obj)((k, _cast_floats(v, dtype)) for k, v in obj.items())
    return obj


class _AutocastRegion:
    """A forward pre-hook / hook pair that runs a module inside ``torch.autocast(device, dtype, enabled)``.

    ``cast_inputs`` / ``cast_outputs`` (a dtype or None) cast the floating tensors of the arguments / result.
    The post-hook is registered with ``always_call=True`` so that the autocast state is restored even when the
    forward raises.
    """

    def __init__(self, device_type: str, dtype: Optional[torch.dtype], enabled: bool,
                 cast_inputs: Optional[torch.dtype] = None, cast_outputs: Optional[torch.dtype] = None):
        self.device_type, self.dtype, self.enabled = device_type, dtype, enabled
        self.cast_inputs, self.cast_outputs = cast_inputs, cast_outputs
        self._stack: List[torch.autocast] = []

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        ctx = torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
        ctx.__enter__()
        self._stack.append(ctx)
        if self.cast_inputs is not None:
            return _cast_floats(args, self.cast_inputs), _cast_floats(kwargs, self.cast_inputs)
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self._stack:
            self._stack.pop().__exit__(None, None, None)
        if self.cast_outputs is not None and output is not None:
            return _cast_floats(output, self.cast_outputs)
        return None

    def register(self, module: nn.Module) -> List[Any]:
        return [module.register_forward_pre_hook(self.pre, with_kwargs=True),
                module.register_forward_hook(self.post, with_kwargs=True, always_call=True)]


class SpeedHandle:
    """Hooks registered by :func:`enable_amp` (and the channels-last input hook); ``remove()`` undoes them."""

    def __init__(self, handles: Iterable[Any] = ()):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _output_cast_hook(dtype: torch.dtype) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _cast_floats(output, dtype)
    return hook


def enable_amp(model: nn.Module, amp: str, fp32_modules: Sequence[str] = FP32_MODULES,
               fp32_output_modules: Sequence[str] = FP32_OUTPUT_MODULES) -> SpeedHandle:
    """Run ``model``'s forward under autocast (``amp`` = ``'bf16'`` or ``'fp16'``) with fp32 islands.

    Args:
        model: a built model (normally ``Generalized_RCNN``); its device picks the autocast device.
        amp: ``'bf16'`` (CPU or CUDA) or ``'fp16'`` (CUDA only).
        fp32_modules: dotted sub-module paths run entirely in fp32 (inputs cast to fp32, autocast off inside).
        fp32_output_modules: dotted sub-module paths whose floating outputs are cast to fp32.
    Paths that do not exist in ``model`` are skipped. Returns a :class:`SpeedHandle` whose ``remove()`` turns it
    all off again. The islands also hold when the caller enters autocast itself around ``model(...)``.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    device_type = _model_device(model).type
    if amp == "fp16" and device_type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA model; use 'bf16' on the CPU")
    dtype = AMP_DTYPES[amp]
    handles = _AutocastRegion(device_type, dtype, True).register(model)
    for path in fp32_modules:
        sub = _submodule(model, path)
        if sub is not None:
            handles += _AutocastRegion(device_type, None, False, cast_inputs=torch.float32).register(sub)
    for path in fp32_output_modules:
        sub = _submodule(model, path)
        if sub is not None:
            handles.append(sub.register_forward_hook(_output_cast_hook(torch.float32)))
    return SpeedHandle(handles)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile.
def compile_conv_body(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile ``model.Conv_Body`` in place with ``nn.Module.compile`` (state-dict keys unchanged). On the CPU the
    inductor's ``freezing`` (constant weights, prepacked for oneDNN) is on unless ``compile_kwargs`` say otherwise.
    The first call per input size compiles (tens of seconds for ResNet-50-FPN on two cores)."""
    body = getattr(model, "Conv_Body", None)
    if not isinstance(body, nn.Module):
        raise ValueError("compile_conv_body needs a model with a Conv_Body module")
    if _model_device(body).type == "cpu":
        options = dict(compile_kwargs.pop("options", None) or {})
        options.setdefault("freezing", True)
        compile_kwargs["options"] = options
    body.compile(**compile_kwargs)
    return model


# --------------------------------------------------------------------------------------------------------------------
def prepare_for_inference(model: nn.Module, cfg=None, *, fold_bn: Optional[bool] = None,
                          fuse_activations: Optional[bool] = None, channels_last: Optional[bool] = None,
                          amp: Optional[str] = None, compile_body: Optional[bool] = None) -> nn.Module:
    """Apply the inference speed features to ``model`` in place and put it in eval mode.

    Each feature is taken from the explicit argument when given, else from ``cfg`` (``TEST.FUSE_FROZEN_BN``,
    ``TEST.FUSE_CONV_ACTIVATIONS``, ``TEST.CHANNELS_LAST``, ``TEST.AMP``, ``TEST.COMPILE``), else from
    ``model.cfg``, else the defaults (all on except ``AMP`` and ``COMPILE``). Conv/activation fusion needs
    folded BN and is skipped without it. The model is for inference only afterwards (folded parameters train
    wrongly). Returns ``model``.
    """
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    pick = lambda arg, key: _cfg_value(cfg, key) if arg is None else arg  # noqa: E731
    fold = bool(pick(fold_bn, "TEST.FUSE_FROZEN_BN"))
    fuse = bool(pick(fuse_activations, "TEST.FUSE_CONV_ACTIVATIONS"))
    cl = bool(pick(channels_last, "TEST.CHANNELS_LAST"))
    amp = str(pick(amp, "TEST.AMP"))
    comp = bool(pick(compile_body, "TEST.COMPILE"))
    if amp not in ("",) + tuple(AMP_DTYPES):
        raise ValueError(f"TEST.AMP / amp must be '', 'bf16' or 'fp16', got {amp!r}")
    model.eval()
    if fold:
        fold_frozen_bn(model)
    fuse = fuse and fold and _model_device(model).type == "cpu"
    if fuse:
        fuse_conv_activations(model)
    if cl:
        to_channels_last(model)
    if amp:
        model._speed_amp_handle = enable_amp(model, amp)
    if comp:
        compile_conv_body(model)
    logger.info("inference speed features: folded BN %s, fused conv+activation %s, channels-last %s, amp %s, "
                "compile %s", fold, fuse, cl, amp or "off", comp)
    return model


def prepare_for_training(model: nn.Module, cfg=None, *, fold_bn: Optional[bool] = None,
                         channels_last: Optional[bool] = None) -> nn.Module:
    """Apply the training speed features in place (``TRAIN.FUSE_FROZEN_BN``, ``TRAIN.CHANNELS_LAST``; explicit
    arguments win, then ``cfg``, then ``model.cfg``). Parameters keep their identity, so this may run before or
    after the optimizer is built; checkpoints load and save as before. Returns ``model``."""
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    fold = bool(_cfg_value(cfg, "TRAIN.FUSE_FROZEN_BN") if fold_bn is None else fold_bn)
    cl = bool(_cfg_value(cfg, "TRAIN.CHANNELS_LAST") if channels_last is None else channels_last)
    if fold:
        fold_frozen_bn_for_training(model)
    if cl:
        to_channels_last(model)
    return model
