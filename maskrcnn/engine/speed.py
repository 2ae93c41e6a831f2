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

Every function edits the model in place and returns it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modeling.backbone.fpn import FPN
from ..modeling.backbone.resnet import BasicBlock, BottleneckBlock, FrozenBatchNorm2d, fuse_frozen_bn

__all__ = [
    "AMP_DTYPES",
    "FP32_MODULES",
    "FP32_OUTPUT_MODULES",
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
# oneDNN fused convolutions (inference, CPU).
def onednn_fusion_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution ops (``torch.ops.mkldnn._convolution_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


class FusedConv2d(nn.Module):
    """Inference-only convolution with a fused epilogue: ``act(conv(x) [+ other])``.

    On the CPU with oneDNN it is one primitive (``mkldnn._convolution_pointwise``: the ReLU and the residual add
    happen while the output tile is in cache); elsewhere, or when gradients are needed, it is ``F.conv2d`` followed
    by the same add and activation.

    Args:
        conv: a ``Conv2d`` with ``padding_mode='zeros'``; its weight and bias are copied into buffers (``weight``,
            ``bias``) under the same names.
        activation: ``"relu"`` or ``"none"``.

    ``forward(x: (N, C_in, H, W), other: optional (N, C_out, H', W') residual) -> (N, C_out, H', W')``. Under CPU
    autocast the convolution runs in the autocast dtype (weights cast once and cached per dtype); the output is in
    the dtype the convolution ran in.
    """

    def __init__(self, conv: nn.Conv2d, activation: str = "none"):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"FusedConv2d needs an nn.Conv2d with numeric zero padding, got {conv!r}")
        if activation not in ("relu", "none"):
            raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation, self.groups = tuple(conv.padding), tuple(conv.dilation), conv.groups
        self.activation = activation
        self.register_buffer("weight", conv.weight.detach().clone())
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(
            conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        self.register_buffer("bias", bias)
        # dtype -> (weight, bias) cast copies for autocast; dropped whenever the module is moved or cast.
        self._cast_cache: Dict[torch.dtype, Tuple[Tensor, Tensor]] = {}

    def _apply(self, fn, recurse=True):
        self._cast_cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cast_cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _params_for(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        cached = self._cast_cache.get(dtype)
        if cached is None:
            w = self.weight.to(dtype)
            if self.weight.is_contiguous(memory_format=torch.channels_last):
                w = w.contiguous(memory_format=torch.channels_last)
            cached = (w, self.bias.to(dtype))
            self._cast_cache[dtype] = cached
        return cached

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype

    def forward(self, x: Tensor, other: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
        """``act(conv(x) [+ other])``; with ``accumulate=True`` the result is written into ``other`` (which the
        caller must own and never read again as the addend) instead of a new tensor, when oneDNN runs it."""
        dtype = self._compute_dtype(x)
        weight, bias = self._params_for(dtype)
        x = x.to(dtype)
        if other is not None:
            other = other.to(dtype)
        # oneDNN's fused kernels take channels-last activations; for contiguous ones PyTorch falls back to a
        # separate add/ReLU that lacks some dtypes, so those run the plain path below.
        onednn = (x.device.type == "cpu" and x.dim() == 4 and onednn_fusion_available()
                  and x.is_contiguous(memory_format=torch.channels_last)
                  and not (torch.is_grad_enabled() and x.requires_grad))
        if onednn:
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if other is None:
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, self.activation, [], "")
            unary = "relu" if self.activation == "relu" else None
            other = other.contiguous(memory_format=torch.channels_last)
            if accumulate:
                # Writing into the addend saves allocating (and page-faulting) a fresh output.
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    other, x, weight, bias, *args, "add", 1.0, unary, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, weight, bias, *args, "add", 1.0, unary, [], "")
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if other is not None:
            y = y + other
        return F.relu(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"activation={self.activation!r}")


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class FusedBottleneck(nn.Module):
    """A folded :class:`BottleneckBlock` as three fused convs: ``relu(conv3(relu(conv2(relu(conv1 x)))) + sc)``
    with the shortcut ``sc`` either ``x`` or the folded projection ``downsample``.

    ``reuse_input``: the block's input is never read after the block (true inside a stage ``nn.Sequential``
    except for its first block), so the output may overwrite it. A projection shortcut is always fresh and is
    overwritten in any case.
    """

    def __init__(self, block: BottleneckBlock, reuse_input: bool = False):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, "relu")
        self.conv2 = FusedConv2d(block.conv2, "relu")
        self.conv3 = FusedConv2d(block.conv3, "relu")
        self.downsample = FusedConv2d(block.downsample[0]) if block.downsample is not None else None
        self.reuse_input = bool(reuse_input)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        reuse = self.downsample is not None or self.reuse_input
        return self.conv3(self.conv2(self.conv1(x)), shortcut, accumulate=reuse)


class FusedBasicBlock(nn.Module):
    """A folded :class:`BasicBlock` as two fused convs: ``relu(conv2(relu(conv1 x)) + sc)`` (``reuse_input`` as
    for :class:`FusedBottleneck`)."""

    def __init__(self, block: BasicBlock, reuse_input: bool = False):
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, "relu")
        self.conv2 = FusedConv2d(block.conv2, "relu")
        self.downsample = FusedConv2d(block.downsample[0]) if block.downsample is not None else None
        self.reuse_input = bool(reuse_input)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        reuse = self.downsample is not None or self.reuse_input
        return self.conv2(self.conv1(x), shortcut, accumulate=reuse)


class FusedFPN(nn.Module):
    """An :class:`~maskrcnn.modeling.backbone.fpn.FPN` without GroupNorm whose lateral 1x1 convs add the
    upsampled coarser level inside the convolution (into the upsampled tensor, no extra output allocated).
    Same inputs, outputs and arithmetic as the FPN it is built from."""

    def __init__(self, fpn: FPN):
        super().__init__()
        if not all(isinstance(m, nn.Conv2d) for m in list(fpn.lateral_convs) + list(fpn.output_convs)):
            raise ValueError("FusedFPN needs an FPN of plain convolutions (use_gn=False)")
        self.lateral_convs = nn.ModuleList(FusedConv2d(c) for c in fpn.lateral_convs)
        self.output_convs = nn.ModuleList(FusedConv2d(c) for c in fpn.output_convs)
        self.in_channels_list, self.out_channels = list(fpn.in_channels_list), fpn.out_channels
        self.top_block, self.num_outputs = fpn.top_block, fpn.num_outputs

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        features = list(features)
        if len(features) != len(self.lateral_convs):
            raise ValueError(f"FPN was built for {len(self.lateral_convs)} input levels, got {len(features)}")
        inner = self.lateral_convs[-1](features[-1])
        results = [self.output_convs[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            top_down = F.interpolate(inner, size=features[i].shape[-2:], mode="nearest")
            inner = self.lateral_convs[i](features[i], top_down, accumulate=True)
            results.insert(0, self.output_convs[i](inner))
        if self.top_block == "maxpool":
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


def _is_folded(block: nn.Module) -> bool:
    """A block whose norms were all folded: every ``bnK`` (and ``downsample.1``) is an Identity."""
    norms = [m for n, m in block.named_children() if n.startswith("bn")]
    if block.downsample is not None:
        if not (isinstance(block.downsample, nn.Sequential) and len(block.downsample) == 2):
            return False
        norms.append(block.downsample[1])
    return all(isinstance(m, nn.Identity) for m in norms)


def fuse_conv_activations(model: nn.Module) -> int:
    """Replace, in place, every folded ResNet block by its :class:`FusedBottleneck` / :class:`FusedBasicBlock`,
    every folded stem ``(conv1, Identity, ReLU, ...)`` by a conv+ReLU :class:`FusedConv2d`, and every FPN of
    plain convolutions by a :class:`FusedFPN`.

    Blocks whose norms are not folded (GN, trainable BN, or :func:`fold_frozen_bn` not applied) are left alone.
    Returns the number of modules replaced (0 when oneDNN's fused ops are unavailable). Inference only.
    """
    if not onednn_fusion_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for index, (name, child) in enumerate(list(parent.named_children())):
            # Inside a stage, a block's input is only the previous block's output: it may be overwritten.
            reuse = isinstance(parent, nn.Sequential) and index > 0
            if isinstance(child, BottleneckBlock) and _is_folded(child):
                setattr(parent, name, FusedBottleneck(child, reuse_input=reuse))
                count += 1
            elif isinstance(child, BasicBlock) and _is_folded(child):
                setattr(parent, name, FusedBasicBlock(child, reuse_input=reuse))
                count += 1
            elif type(child) is FPN and all(isinstance(m, nn.Conv2d) for m in child.lateral_convs):
                setattr(parent, name, FusedFPN(child))
                count += 1
        # The ResNet stem: Sequential(conv1, bn1, relu, maxpool) with bn1 folded.
        if isinstance(parent, nn.Sequential) and {"conv1", "bn1", "relu"} <= set(parent._modules):
            conv, bn, relu = parent.conv1, parent.bn1, parent.relu
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.Identity) and isinstance(relu, nn.ReLU):
                parent.conv1 = FusedConv2d(conv, "relu")
                parent.relu = nn.Identity()
                count += 1
    return count


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


# --------------------------------------------------------------------------------------------------------------------
# Training: FrozenBN folded on the fly.
class FrozenBNConv2d(nn.Conv2d):
    """``bn(conv(x))`` for a fixed ``FrozenBatchNorm2d`` ``bn`` as one convolution with weight ``W * s`` and bias
    ``b * s + t`` (``s, t = bn.scale_and_shift()``), computed at every call so that training ``W`` (and loading
    new BN buffers) stays exact. Holds the original conv's ``Parameter`` objects under the same names; the BN module
    stays in the model (as :class:`FoldedFrozenBatchNorm2d`, an identity that keeps the buffers and their keys).
    """

    def __init__(self, conv: nn.Conv2d, bn: "FoldedFrozenBatchNorm2d"):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        # Not a sub-module: the BN stays registered where it was (its buffers keep their state-dict keys).
        self.__dict__["_frozen_bn"] = bn

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._frozen_bn.scale_and_shift()
        w_dtype = self.weight.dtype
        if self.padding_mode != "zeros":
            weight = self.weight * scale.to(w_dtype).view(-1, 1, 1, 1)
            bias = shift.to(w_dtype) if self.bias is None else self.bias * scale.to(w_dtype) + shift.to(w_dtype)
            return self._conv_forward(x, weight, bias)
        # PyTorch sends 1x1 convolutions to its slower reference kernel when it runs single-threaded; oneDNN's
        # (what it picks with more threads) is ~25% faster on channels-last inputs.
        onednn = (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                  and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
                  and x.is_contiguous(memory_format=torch.channels_last))
        return _ScaledWeightConv.apply(x, self.weight, self.bias, scale.to(w_dtype), shift.to(w_dtype),
                                       (self.stride, self.padding, self.dilation, self.groups, onednn))


class _ScaledWeightConv(torch.autograd.Function):
    """``conv2d(x, weight * scale, bias * scale + shift)`` (``bias`` may be None) whose backward recomputes the
    scaled weight from ``weight``, a parameter held anyway, instead of saving the scaled copy: saved, the copies
    of res3-res5 would add about 90 MB to every training step. Gradients are those autograd gives for the
    unfused expression (the same operations: ``grad_weight = grad_scaled_weight * scale``). Under autocast the
    convolution runs in the autocast dtype, as ``F.conv2d`` would (inputs cast, the cast input saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor,
                conf: Tuple[Any, ...]) -> Tensor:
        stride, padding, dilation, groups, onednn = conf
        scaled = weight * scale.view(-1, 1, 1, 1)
        b = shift if bias is None else bias * scale + shift
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x_in = x.to(dtype)
        with torch.autocast(device_type, enabled=False):
            scaled, b = scaled.to(dtype), b.to(dtype)
            if onednn and dtype == torch.float32:
                y = torch.ops.aten.mkldnn_convolution(x_in, scaled, b, list(padding), list(stride), list(dilation),
                                                      groups)
            else:
                y = F.conv2d(x_in, scaled, b, stride, padding, dilation, groups)
        ctx.save_for_backward(x_in, weight, scale)
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups, _ = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        scaled = (weight * scale.view(-1, 1, 1, 1)).to(x.dtype)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, scaled, [scaled.shape[0]], list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_x, need_w, need_b and ctx.has_bias])
        grad_x = gx.to(ctx.x_dtype) if need_x else None
        grad_weight = gw.to(weight.dtype) * scale.view(-1, 1, 1, 1) if need_w else None
        grad_bias = gb.to(weight.dtype) * scale if need_b and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A ``FrozenBatchNorm2d`` whose transform was folded into the preceding :class:`FrozenBNConv2d`: identity in
    forward, same buffers (and state-dict keys) as the original."""

    @classmethod
    def from_frozen(cls, bn: FrozenBatchNorm2d) -> "FoldedFrozenBatchNorm2d":
        folded = cls(bn.num_features, eps=bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(folded, name, getattr(bn, name))
        return folded

    def forward(self, x: Tensor) -> Tensor:
        return x


def fold_frozen_bn_for_training(model: nn.Module) -> int:
    """Replace, in place, each (``Conv2d``, ``FrozenBatchNorm2d``) pair that runs back to back (Detectron names
    ``convK``/``bnK`` in one module, or consecutive elements of an ``nn.Sequential``) by a :class:`FrozenBNConv2d`
    and a :class:`FoldedFrozenBatchNorm2d`. Trainable parameters (objects and names), buffers and state-dict keys
    are unchanged. Returns the number of pairs folded."""
    count = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        pairs: List[Tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs += list(zip(names, names[1:]))
        pairs += [(n, "bn" + n[4:]) for n in children if n.startswith("conv") and "bn" + n[4:] in children]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if (type(conv) is nn.Conv2d and isinstance(bn, FrozenBatchNorm2d)
                    and not isinstance(bn, FoldedFrozenBatchNorm2d) and conv.out_channels == bn.num_features):
                folded_bn = FoldedFrozenBatchNorm2d.from_frozen(bn)
                setattr(parent, bn_name, folded_bn)
                setattr(parent, conv_name, FrozenBNConv2d(conv, folded_bn))
                count += 1
    return count


def unfold_frozen_bn_for_training(model: nn.Module) -> int:
    """Undo :func:`fold_frozen_bn_for_training` in place: each :class:`FrozenBNConv2d` becomes a plain ``Conv2d``
    (same ``Parameter`` objects) and each :class:`FoldedFrozenBatchNorm2d` a ``FrozenBatchNorm2d`` (same buffers).
    Returns the number of pairs restored."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBNConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, groups=child.groups,
                                 bias=child.bias is not None, padding_mode=child.padding_mode, device="meta")
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
                count += 1
            elif isinstance(child, FoldedFrozenBatchNorm2d):
                bn = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    setattr(bn, buf, getattr(child, buf))
                setattr(parent, name, bn)
    return count


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
