"""Speed features, applied to a built model: every one keeps the model's results (up to float rounding, or within
the documented bf16 tolerance) and is switched by a config key.

The transforms find what they change through what the modules declare, never through attribute paths into the
model, so they work on any arrangement of the parts:

* ``conv_bn_pairs()`` (ResNet blocks and stem; an ``nn.Sequential`` pairs by order): which norm follows which
  convolution, read by :func:`~maskrcnn.modeling.backbone.frozen_bn.find_conv_bn_pairs` for both BN folds;
* ``fp32_island = True`` (the RPN predictors, ``Box_Outs``): run in fp32 under mixed precision;
  ``fp32_output = True`` (``Mask_Outs``): outputs cast to fp32 under mixed precision;
* the ResNet itself takes a channels-last image when its weights are channels-last.

A transform that the config (or an explicit argument) asks for and that finds nothing to do in the model raises a
``ConfigError`` naming the key, instead of leaving the model as it was.

Inference (:func:`prepare_for_inference`, keys under ``TEST``):

* ``FUSE_FROZEN_BN``: fold every ``FrozenBatchNorm2d`` (and eval-mode ``BatchNorm2d``) into the convolution
  before it; saves two elementwise passes per conv.
* ``FUSE_CONV_ACTIVATIONS``: on the CPU, run the folded ResNet blocks with oneDNN's fused primitives
  (conv + ReLU, and conv + residual add + ReLU in one pass) through :class:`FusedConv2d`; needs folded BN and
  does not apply without it or off the CPU.
* ``CHANNELS_LAST``: convolution weights (and so the body's input) in channels-last memory format, the layout
  oneDNN convolves in without reordering every activation.
* ``AMP``: ``'bf16'`` (CPU or CUDA) / ``'fp16'`` (CUDA) autocast around the model's forward, with the fp32
  islands above: proposal ranking, box decoding, score thresholds and NMS see fp32 logits and deltas, and mask
  logits reach the sigmoid in fp32. This is the only way inference runs in mixed precision: :func:`enable_amp`
  installs it as hooks and returns a :class:`SpeedHandle`, whose ``remove()`` undoes it and whose ``autocast()``
  is the same region for code that calls the model's parts itself (``core/test.py``'s ``im_detect_all``).
* ``COMPILE``: ``torch.compile`` of ``Conv_Body`` (inductor, freezing on the CPU). Optional: compilation takes
  tens of seconds per input size, and the fused eager path reaches about the same speed.

Training (:func:`prepare_for_training`, keys under ``TRAIN``):

* ``FUSE_FROZEN_BN``: each (conv, ``FrozenBatchNorm2d``) pair becomes one convolution whose weight is scaled by the
  frozen BN on the fly (:class:`FrozenBNConv2d`). Gradients are those of the unfused pair; parameters, buffers and
  state-dict keys are unchanged (same ``Parameter`` objects, the BN keeps its buffers), so optimizers and
  checkpoints are unaffected. A body without frozen BN (``RESNETS.NORM`` ``'BN'`` with ``FREEZE_AT: 0``, or
  ``'GN'``) has nothing to fold: set the key to False.
* ``CHANNELS_LAST``: as for inference.
* ``WINOGRAD``: every plain 3x3 stride-1 ``nn.Conv2d`` (FPN outputs, RPN, mask head) becomes a
  :class:`WinogradConv2d`, and every such :class:`FrozenBNConv2d` (the ResNet blocks' middle 3x3) a
  :class:`WinogradFrozenBNConv2d`, in place (the class only: same parameters, keys and hooks), whose float32 CPU
  forward and backward run in the Winograd transform domain where that pays (``winograd_training.py``).

Every transform edits the model in place. The oneDNN modules live in ``onednn_fusion.py`` and the training fold
in ``frozen_bn_training.py`` (both re-exported here); the AMP dtype map in ``amp.py``.
"""
from __future__ import annotations

import logging
import contextlib
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..modeling.backbone.frozen_bn import find_conv_bn_pairs, fold_frozen_bn_pairs
from ..utils.model import model_device
from .amp import AMP_DTYPES, check_amp
from .frozen_bn_training import (FoldedFrozenBatchNorm2d, FrozenBNConv2d, fold_frozen_bn_for_training,
                                 unfold_frozen_bn_for_training)
from .onednn_fusion import (FusedBasicBlock, FusedBottleneck, FusedConv2d, FusedFPN, enable_winograd,
                            fuse_conv_activations, onednn_fusion_available)
from .winograd_training import WinogradConv2d, WinogradFrozenBNConv2d, enable_winograd_training

__all__ = [
    "FoldedFrozenBatchNorm2d",
    "FrozenBNConv2d",
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedConv2d",
    "WinogradConv2d",
    "WinogradFrozenBNConv2d",
    "enable_winograd",
    "enable_winograd_training",
    "FusedFPN",
    "SpeedHandle",
    "compile_conv_body",
    "enable_amp",
    "find_fp32_islands",
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


# --------------------------------------------------------------------------------------------------------------------
# Frozen BN folding (inference).
def fold_frozen_bn(model: nn.Module) -> int:
    """Fold every ``FrozenBatchNorm2d`` (and every ``nn.BatchNorm2d`` in eval mode, e.g. a model trained with
    ``RESNETS.NORM: BN``) that the modules declare after a ``Conv2d`` into it, in place. Inference only: the folded
    parameters no longer match the checkpoint's names, and the BN becomes ``nn.Identity``. Returns the number of
    pairs folded."""
    # A model prepared for training computes its BN inside FrozenBNConv2d: undo that first, or it would be
    # folded twice.
    unfold_frozen_bn_for_training(model)
    return fold_frozen_bn_pairs(model, eval_batch_norm=True)


# --------------------------------------------------------------------------------------------------------------------
# Channels-last.
def to_channels_last(model: nn.Module) -> int:
    """Convert every 4-D parameter and buffer to channels-last, in place (the ResNet then takes its image
    channels-last too, so that every feature map downstream is). Returns the number of 4-D tensors."""
    count = sum(1 for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4)
    model.to(memory_format=torch.channels_last)
    return count


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

    ``cast_inputs`` (a dtype or None) casts the floating tensors of the arguments. The post-hook is registered
    with ``always_call=True`` so that the autocast state is restored even when the forward raises.
    """

    def __init__(self, device_type: str, dtype: Optional[torch.dtype], enabled: bool,
                 cast_inputs: Optional[torch.dtype] = None):
        self.device_type, self.dtype, self.enabled = device_type, dtype, enabled
        self.cast_inputs = cast_inputs
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
        return None

    def register(self, module: nn.Module) -> List[Any]:
        return [module.register_forward_pre_hook(self.pre, with_kwargs=True),
                module.register_forward_hook(self.post, with_kwargs=True, always_call=True)]


def _output_cast_hook(dtype: torch.dtype) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _cast_floats(output, dtype)
    return hook


class SpeedHandle:
    """What :func:`enable_amp` (through :func:`prepare_for_inference`) installed on a model.

    ``handles``: the hook handles; ``remove()`` removes them all, after which the model computes as before (and
    ``autocast()`` is a null context).
    ``amp``: ``''``, ``'bf16'`` or ``'fp16'``; ``device_type``: where the model runs. ``autocast()`` is the region
    the model's forward runs in (a null context without AMP), for callers that run the model's parts themselves.
    """

    def __init__(self, handles: Iterable[Any] = (), amp: str = "", device_type: str = "cpu"):
        self.handles = list(handles)
        self.amp, self.device_type = amp, device_type

    def autocast(self):
        """``torch.autocast`` with the handle's device and dtype, or a null context when there is no AMP."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.amp = ""


def find_fp32_islands(model: nn.Module) -> Tuple[List[nn.Module], List[nn.Module]]:
    """The modules of ``model`` (itself included) that declare ``fp32_island = True`` (run wholly in fp32 under
    autocast) and those that declare ``fp32_output = True`` (outputs cast to fp32), in ``model.modules()`` order."""
    islands = [m for m in model.modules() if getattr(m, "fp32_island", False) is True]
    outputs = [m for m in model.modules() if getattr(m, "fp32_output", False) is True]
    return islands, outputs


def enable_amp(model: nn.Module, amp: str, what: str = "amp") -> SpeedHandle:
    """Run ``model``'s forward under autocast (``amp`` = ``'bf16'`` or ``'fp16'``) with fp32 islands.

    Args:
        model: a built model (normally ``Generalized_RCNN``); its device picks the autocast device.
        amp: ``'bf16'`` (CPU or CUDA) or ``'fp16'`` (CUDA only).
        what: how errors name the setting (``'TEST.AMP'`` from :func:`prepare_for_inference`).

    Every module declaring ``fp32_island = True`` gets its floating inputs cast to fp32 and runs with autocast
    off; every module declaring ``fp32_output = True`` gets its floating outputs cast to fp32. The islands also
    hold when the caller enters autocast itself (``SpeedHandle.autocast()``). Raises ``ConfigError`` when no module
    declares an island: the detector's box maths would then run on half-precision logits. Returns the
    :class:`SpeedHandle` whose ``remove()`` turns it all off again.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"{what} must be 'bf16' or 'fp16' to enable mixed precision, got {amp!r}")
    device_type = model_device(model).type
    check_amp(amp, device_type, what)
    islands, outputs = find_fp32_islands(model)
    if not islands and not outputs:
        raise ConfigError(f"{what} = {amp!r}: no module of {type(model).__name__} declares `fp32_island = True` or "
                          f"`fp32_output = True`, so box decoding and NMS would read {amp} logits; mark the "
                          f"predictor modules (as RPNHead, FastRCNNOutputs and MaskRCNNOutputs do) or leave {what} "
                          f"empty")
    handles = _AutocastRegion(device_type, AMP_DTYPES[amp], True).register(model)
    for module in islands:
        handles += _AutocastRegion(device_type, None, False, cast_inputs=torch.float32).register(module)
    for module in outputs:
        handles.append(module.register_forward_hook(_output_cast_hook(torch.float32)))
    return SpeedHandle(handles, amp, device_type)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile.
def compile_conv_body(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile ``model.Conv_Body`` in place with ``nn.Module.compile`` (state-dict keys unchanged). On the CPU the
    inductor's ``freezing`` (constant weights, prepacked for oneDNN) is on unless ``compile_kwargs`` say otherwise.
    The first call per input size compiles (tens of seconds for ResNet-50-FPN on two cores)."""
    body = getattr(model, "Conv_Body", None)
    if not isinstance(body, nn.Module):
        raise ValueError("compile_conv_body needs a model with a Conv_Body module")
    if model_device(body).type == "cpu":
        options = dict(compile_kwargs.pop("options", None) or {})
        options.setdefault("freezing", True)
        compile_kwargs["options"] = options
    body.compile(**compile_kwargs)
    return model


# --------------------------------------------------------------------------------------------------------------------
def _setting(cfg, arg: Any, key: str, param: str) -> Tuple[Any, str]:
    """The value of a feature (explicit argument, else ``cfg``, else the default) and how errors name it."""
    if arg is not None:
        return arg, f"{param}={arg!r}"
    value = _cfg_value(cfg, key)
    return value, f"{key} = {value!r}"


def _nothing_to_do(asked: str, found: str, fix: str) -> ConfigError:
    return ConfigError(f"{asked} asks for a speed feature that has nothing to act on: {found}. {fix}")


def _has_folded_bn(model: nn.Module) -> bool:
    # A model prepared before: its declared norms are already Identity (or inside fused oneDNN blocks).
    return any(isinstance(m, FusedConv2d) for m in model.modules()) or any(
        isinstance(p.norm, nn.Identity) and type(p.conv) is nn.Conv2d for p in find_conv_bn_pairs(model))


def prepare_for_inference(model: nn.Module, cfg=None, *, fold_bn: Optional[bool] = None,
                          fuse_activations: Optional[bool] = None, channels_last: Optional[bool] = None,
                          amp: Optional[str] = None, compile_body: Optional[bool] = None,
                          quantize: Optional[str] = None, calib_images: Optional[Sequence[Any]] = None,
                          quantize_heads: Optional[bool] = None, winograd: Optional[bool] = None,
                          return_handle: bool = False
                          ) -> Union[nn.Module, Tuple[nn.Module, SpeedHandle]]:
    """Apply the inference speed features to ``model`` in place and put it in eval mode.

    Each feature is taken from the explicit argument when given, else from ``cfg`` (``TEST.FUSE_FROZEN_BN``,
    ``TEST.FUSE_CONV_ACTIVATIONS``, ``TEST.CHANNELS_LAST``, ``TEST.AMP``, ``TEST.COMPILE``, ``TEST.WINOGRAD``), else
    from ``model.cfg``, else the defaults (all on except ``AMP`` and ``COMPILE``). Conv/activation fusion applies on
    the CPU with oneDNN and folded BN only; ``winograd`` / ``TEST.WINOGRAD`` with that fusion and without ``AMP``
    (:func:`maskrcnn.engine.onednn_fusion.enable_winograd`: float32 3x3 convolutions of 256+ channels on maps of
    14x14 or more as Winograd F(m x m, 3x3), equal up to float rounding). A feature asked for that finds nothing to
    change in the model raises a ``ConfigError`` naming the key (e.g. ``TEST.FUSE_FROZEN_BN`` on a GroupNorm body).
    The model is for inference only afterwards (folded parameters train wrongly).

    ``quantize`` / ``TEST.QUANTIZE`` 'int8' quantizes the ResNet stages and FPN convolutions, and with
    ``quantize_heads`` / ``TEST.QUANTIZE_HEADS`` (default on) the RPN's and the RoI heads' feature layers
    (:func:`maskrcnn.engine.quantize.quantize_int8`, CPU only, with folded BN and without the oneDNN fused blocks,
    which it replaces), calibrated by running the model on ``calib_images`` (``(3, H, W)`` float tensors, a few
    images of the user's data; required then, else a ``ConfigError``).

    Returns ``model``, or ``(model, handle)`` with ``return_handle=True``: the :class:`SpeedHandle` of the AMP
    hooks (``handle.remove()`` undoes them, ``handle.autocast()`` runs the model's parts in the same precision).
    """
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    fold, fold_key = _setting(cfg, fold_bn, "TEST.FUSE_FROZEN_BN", "fold_bn")
    fuse, fuse_key = _setting(cfg, fuse_activations, "TEST.FUSE_CONV_ACTIVATIONS", "fuse_activations")
    cl, cl_key = _setting(cfg, channels_last, "TEST.CHANNELS_LAST", "channels_last")
    amp_value, _ = _setting(cfg, amp, "TEST.AMP", "amp")
    comp, _ = _setting(cfg, compile_body, "TEST.COMPILE", "compile_body")
    quant, _ = _setting(cfg, quantize, "TEST.QUANTIZE", "quantize")
    quant_heads, _ = _setting(cfg, quantize_heads, "TEST.QUANTIZE_HEADS", "quantize_heads")
    wino, _ = _setting(cfg, winograd, "TEST.WINOGRAD", "winograd")
    fold, fuse, cl, amp_value, comp = bool(fold), bool(fuse), bool(cl), str(amp_value), bool(comp)
    quant = str(quant or "")
    amp_name = "TEST.AMP" if amp is None else "amp"
    check_amp(amp_value, model_device(model), amp_name)
    if quant:
        from .quantize import check_quantize

        check_quantize(quant, model_device(model), amp_value, comp, "TEST.QUANTIZE" if quantize is None else "quantize")
        if any(isinstance(m, nn.GroupNorm) for m in getattr(model, "Conv_Body", model).modules()):
            raise ConfigError(f"TEST.QUANTIZE = {quant!r} needs a body and FPN whose norms fold into their "
                              "convolutions (FrozenBN or BN); this model uses GroupNorm (RESNETS.NORM 'GN' or "
                              "FPN.USE_GN, which train_net --auto chooses for 1-2 images per step). Run it in fp32 "
                              "or bf16 (TEST.AMP), or train with --set RESNETS.NORM BN FPN.USE_GN False")
        if not fold:
            raise ConfigError(f"TEST.QUANTIZE = {quant!r} needs folded BN: set TEST.FUSE_FROZEN_BN True")
        if not calib_images:
            raise ConfigError(f"TEST.QUANTIZE = {quant!r} needs calibration images: pass calib_images= (a few "
                              "(3, H, W) images of your data) to prepare_for_inference or Predictor; "
                              "tools/test_net.py takes the first TEST.QUANTIZE_CALIB_IMAGES images of the dataset")
        fuse = False  # FX fuses conv+ReLU inside the quantized modules itself
    model.eval()
    # A model prepared for training (TRAIN.WINOGRAD): plain convolutions again for the transforms below.
    enable_winograd_training(model, enabled=False)
    if fold and fold_frozen_bn(model) == 0 and not _has_folded_bn(model):
        raise _nothing_to_do(fold_key, f"{type(model).__name__} has no convolution followed by a frozen or "
                             "eval-mode BatchNorm (a GroupNorm body, or no declared conv_bn_pairs())",
                             "Set TEST.FUSE_FROZEN_BN False for such a model.")
    fuse = fuse and fold and model_device(model).type == "cpu" and onednn_fusion_available()
    if fuse and fuse_conv_activations(model) == 0 and not any(isinstance(m, FusedConv2d) for m in model.modules()):
        raise _nothing_to_do(fuse_key, f"{type(model).__name__} has no folded ResNet block, ResNet stem or plain FPN",
                             "Set TEST.FUSE_CONV_ACTIVATIONS False for such a model.")
    # Winograd runs inside the fused modules, in float32 only.
    wino = bool(wino) and fuse and not amp_value
    if wino:
        enable_winograd(model)
    if quant:
        from .quantize import quantize_int8

        quantize_int8(model, calib_images, heads=bool(quant_heads))
    if cl and to_channels_last(model) == 0:
        raise _nothing_to_do(cl_key, f"{type(model).__name__} has no 4-D parameter or buffer",
                             "Set TEST.CHANNELS_LAST False for such a model.")
    handle = SpeedHandle(device_type=model_device(model).type)
    if amp_value:
        handle = enable_amp(model, amp_value, what=amp_name)
    if comp:
        compile_conv_body(model)
    logger.info("inference speed features: folded BN %s, fused conv+activation %s, winograd %s, channels-last %s, "
                "amp %s, compile %s, quantize %s", fold, fuse, wino, cl, amp_value or "off", comp, quant or "off")
    return (model, handle) if return_handle else model


def prepare_for_training(model: nn.Module, cfg=None, *, fold_bn: Optional[bool] = None,
                         channels_last: Optional[bool] = None, winograd: Optional[bool] = None) -> nn.Module:
    """Apply the training speed features in place (``TRAIN.FUSE_FROZEN_BN``, ``TRAIN.CHANNELS_LAST``,
    ``TRAIN.WINOGRAD``; explicit arguments win, then ``cfg``, then ``model.cfg``). Parameters keep their identity,
    so this may run before or after the optimizer is built; checkpoints load and save as before. A feature asked
    for that finds nothing to change raises a ``ConfigError`` naming the key (``TRAIN.WINOGRAD`` excepted: a model
    without a plain 3x3 convolution just keeps oneDNN's). Installs no hooks. Returns ``model``."""
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)
    fold, fold_key = _setting(cfg, fold_bn, "TRAIN.FUSE_FROZEN_BN", "fold_bn")
    cl, cl_key = _setting(cfg, channels_last, "TRAIN.CHANNELS_LAST", "channels_last")
    wino, _ = _setting(cfg, winograd, "TRAIN.WINOGRAD", "winograd")
    if fold and fold_frozen_bn_for_training(model) == 0 and not any(
            isinstance(m, FrozenBNConv2d) for m in model.modules()):
        raise _nothing_to_do(fold_key, f"{type(model).__name__} has no convolution followed by a FrozenBatchNorm2d "
                             "(RESNETS.NORM 'BN' with RESNETS.FREEZE_AT 0, or 'GN', freeze nothing)",
                             "Set TRAIN.FUSE_FROZEN_BN False for such a model.")
    if cl and to_channels_last(model) == 0:
        raise _nothing_to_do(cl_key, f"{type(model).__name__} has no 4-D parameter or buffer",
                             "Set TRAIN.CHANNELS_LAST False for such a model.")
    enable_winograd_training(model, enabled=bool(wino))
    return model
