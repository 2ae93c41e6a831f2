"""int8 post-training static quantization of the ResNet body, the FPN and the heads (``TEST.QUANTIZE 'int8'``).

Flow: PyTorch's FX graph-mode quantization with the ``x86`` backend (``torch.ao.quantization.quantize_fx``,
``get_default_qconfig_mapping('x86')``: per-channel symmetric int8 weights, per-tensor affine uint8 activations
with histogram observers; fbgemm/oneDNN int8 kernels, AVX2 or better, VNNI where the CPU has it; on a CPU with
AMX the layers are packed for the ``onednn`` engine instead, :func:`quantized_engine`). Each ResNet stage
(``res1``..``res5``) and each FPN lateral/output convolution is traced on its own and becomes a ``GraphModule``
that takes and returns float tensors (quantize at its input, dequantize at its output), so the body's own
``forward`` (input checks, the top-down sum and upsampling, P6) runs unchanged in fp32.

With ``heads=True`` (``TEST.QUANTIZE_HEADS``, the default) the heads' feature layers are quantized too: the
RPN's 3x3 convolution and every convolution, transposed convolution and fully connected layer of the box, mask and
keypoint heads (``Box_Head``, ``Mask_Head``, ``Keypoint_Head``; each cascade stage's box head). A head whose
``feature_stack()`` gives its layers as a plain layer/ReLU chain (the FPN mask and keypoint heads, the 2-fc box head)
is quantized as one graph installed as its ``fused_stack``: ReLUs fused, int8 between the layers, one quantize at
its input and one dequantize at its output (at 100 detections, 4 dequantize/quantize pairs and 5 float ReLUs of
the mask head fewer per image; in wall time about 2% on a 2-core Xeon with AMX, within the noise). Other heads
(GroupNorm, C4) are quantized one layer at a time. At 100 detections the mask head's four 256-channel convolutions
cost more than the whole body, and int8 runs them about 2x faster than bf16 on a CPU with VNNI but no AMX (with AMX, bf16 and int8 matmuls run at similar rates: docs/benchmarks.md). The
predictors (``RPN_cls_score``, ``RPN_bbox_pred``, ``Box_Outs``, ``Mask_Outs``, ``Keypoint_Outs``), RoIAlign, NMS
and the box maths stay fp32.

Why not PT2E (``torch.export`` + ``prepare_pt2e`` + ``X86InductorQuantizer`` + ``torch.compile``): with torch 2.14
``torch.ao.quantization.quantize_pt2e`` and ``torch.ao.quantization.quantizer`` are gone (moved to the separate
``torchao`` package), and the body's ``forward`` has data-dependent checks that FX cannot trace as a whole; the
per-stage FX flow needs nothing beyond torch.

The model must have its FrozenBN folded first (``fold_frozen_bn``) and must not hold oneDNN fused blocks
(``TEST.FUSE_CONV_ACTIVATIONS``): FX fuses conv+ReLU itself. Calibration runs the whole model on the given
images (``(3, H, W)`` float tensors as the model takes them), so the observers see the real pre-processing.
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..config.errors import ConfigError

__all__ = ["QUANTIZE_MODES", "QuantizedLayer", "calibration_images", "check_quantize", "cpu_has_vnni", "is_quantized",
           "quantized_engine",
           "quantize_int8"]

_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
#: RPN head children that are predictors (kept fp32); its other convolutions are features.
_RPN_PREDICTORS = ("RPN_cls_score", "RPN_bbox_pred")

#: Where PyTorch's quantized modules live: plain (Conv2d, Linear) and fused with their ReLU (ConvReLU2d, LinearReLU).
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
#: The values ``TEST.QUANTIZE`` accepts.
QUANTIZE_MODES = ("", "int8")
_STAGES = ("res1", "res2", "res3", "res4", "res5")


def check_quantize(mode: str, device: torch.device, amp: str, compile_body: bool, key: str = "TEST.QUANTIZE") -> None:
    """Raise a ``ConfigError`` naming ``key`` when ``mode`` cannot run here."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"{key} = {mode!r}: choose one of {QUANTIZE_MODES} ('' = fp32)")
    if not mode:
        return
    if device.type != "cpu":
        raise ConfigError(f"{key} = {mode!r} runs on the CPU only (int8 x86 kernels); the model is on {device}. "
                          "Use MODEL.DEVICE cpu, or TEST.AMP for reduced precision on the GPU.")
    if "x86" not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"{key} = {mode!r}: this torch build has no x86 quantized engine "
                          f"(supported: {torch.backends.quantized.supported_engines}); set {key} ''.")
    if amp:
        raise ConfigError(f"{key} = {mode!r} and TEST.AMP = {amp!r} exclude each other: set TEST.AMP ''.")
    if compile_body:
        raise ConfigError(f"{key} = {mode!r} and TEST.COMPILE True exclude each other: set TEST.COMPILE False.")


def calibration_images(dataset: Sequence, count: int, key: str = "TEST.QUANTIZE_CALIB_IMAGES") -> List[Tensor]:
    """The first ``count`` images of ``dataset`` (items ``(image (3, H, W) float, target)``), to calibrate on: the
    user's own data, as the model sees it. A ``ConfigError`` naming ``key`` when ``count`` is not positive."""
    if int(count) <= 0:
        raise ConfigError(f"TEST.QUANTIZE needs {key} > 0 (images to calibrate the int8 ranges on), got {count}")
    return [dataset[i][0] for i in range(min(int(count), len(dataset)))]


def is_quantized(model: nn.Module) -> bool:
    """Whether :func:`quantize_int8` has already run on ``model``."""
    return any(isinstance(m, QuantizedLayer) or type(m).__module__.startswith(_QUANTIZED_MODULES)
               for m in model.modules())


def _targets(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """``(parent, child name)`` of every module to quantize: the ResNet stages and the FPN convolutions."""
    body = getattr(model, "Conv_Body", None)
    if not isinstance(body, nn.Module):
        raise ConfigError("TEST.QUANTIZE 'int8' needs a model with a Conv_Body (the built-in ResNet/FPN bodies)")
    bottom = getattr(body, "conv_body", body)
    out = [(bottom, n) for n in _STAGES if isinstance(getattr(bottom, n, None), nn.Module)]
    fpn = getattr(body, "fpn", None)
    if fpn is not None:
        for lst in ("lateral_convs", "output_convs"):
            convs = getattr(fpn, lst, None)
            if isinstance(convs, nn.ModuleList):
                out += [(convs, str(i)) for i, c in enumerate(convs) if type(c) is nn.Conv2d]
    if not out:
        raise ConfigError(f"TEST.QUANTIZE 'int8': {type(body).__name__} has no ResNet stage (res1..res5) or FPN "
                          "convolution to quantize; set TEST.QUANTIZE ''.")
    return out


def _roi_head_modules(model: nn.Module) -> List[nn.Module]:
    roi_heads = getattr(model, "roi_heads", None)
    return [h for h in (getattr(roi_heads, n, None) for n in ("Box_Head", "Mask_Head", "Keypoint_Head"))
            if isinstance(h, nn.Module)]


def _head_stacks(model: nn.Module) -> List[Tuple[nn.Module, nn.Sequential]]:
    """``(head, stack)`` for every RoI head (each cascade stage's too) whose ``feature_stack()`` gives its layers
    as one plain layer/ReLU chain (``maskrcnn.modeling.activation.relu_stack``)."""
    out = []
    for top in _roi_head_modules(model):
        for head in top.modules():
            make = getattr(head, "feature_stack", None)
            stack = make() if callable(make) else None
            if stack is not None:
                out.append((head, stack))
    return out


def _head_targets(model: nn.Module, skip: Sequence[nn.Module] = ()) -> List[Tuple[nn.Module, str]]:
    """``(parent, child name)`` of every head feature layer (module docstring), one entry per layer, except those
    under the heads in ``skip`` (quantized as whole stacks)."""
    out: List[Tuple[nn.Module, str]] = []
    rpn_head = getattr(getattr(model, "RPN", None), "head", None)
    if isinstance(rpn_head, nn.Module):
        out += [(p, n) for p, n in _layers_under(rpn_head) if n not in _RPN_PREDICTORS]
    for head in _roi_head_modules(model):
        out += _layers_under(head, skip)
    return out


def _layers_under(module: nn.Module, skip: Sequence[nn.Module] = ()) -> List[Tuple[nn.Module, str]]:
    skipped = {id(m) for s in skip for m in s.modules()}
    return [(parent, name) for parent in module.modules() if id(parent) not in skipped
            for name, child in parent.named_children() if type(child) in _LAYERS]


def _example_input(module: nn.Module) -> Tensor:
    """A tracing input for ``module``: only its first layer's input width matters to the FX graph."""
    layer = next(m for m in module.modules() if type(m) in _LAYERS)
    if isinstance(layer, nn.Linear):
        return torch.zeros(1, layer.in_features)
    return torch.zeros(1, layer.in_channels, 8, 8)


@torch.no_grad()
def quantize_int8(model: nn.Module, calib_images: Sequence[Tensor], batch_size: int = 1,
                  heads: bool = True) -> nn.Module:
    """Quantize ``model``'s ResNet stages and FPN convolutions (and with ``heads``, the heads' feature layers) to
    int8 in place (module docstring), calibrated by running ``model`` (eval mode, FrozenBN folded, no fused oneDNN
    blocks) on ``calib_images`` (a non-empty sequence of ``(3, H, W)`` float tensors in the model's input format),
    ``batch_size`` images per call. Returns ``model``."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from .onednn_fusion import FusedConv2d

    images = list(calib_images)
    if not images:
        raise ConfigError("TEST.QUANTIZE 'int8' needs calibration images: pass calib_images (a few images of your "
                          "data) or set TEST.QUANTIZE_CALIB_IMAGES > 0")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 or not im.is_floating_point():
            raise ValueError(f"quantize_int8: calibration image {i} must be a (3, H, W) float tensor, got "
                             f"{type(im).__name__} {tuple(getattr(im, 'shape', ()))}")
    if any(isinstance(m, FusedConv2d) for m in model.modules()):
        raise ConfigError("TEST.QUANTIZE 'int8' quantizes plain convolutions: prepare the model with "
                          "TEST.FUSE_CONV_ACTIVATIONS False (prepare_for_inference does this itself)")
    torch.backends.quantized.engine = quantized_engine()
    qconfig = _qconfig_mapping()
    model.eval()
    stacks = _head_stacks(model) if heads else []
    targets = _targets(model) + (_head_targets(model, skip=[h for h, _ in stacks]) if heads else [])
    # Example inputs for tracing: shapes do not matter to the FX graph of these modules, only the channel count.
    prepared = []
    for head, stack in stacks:
        # One graph for the whole chain: ReLUs fused into their layers, activations int8 from its input to its output.
        p = prepare_fx(copy.deepcopy(stack), qconfig, example_inputs=(_example_input(stack),))
        head.fused_stack = p
        prepared.append((head, "fused_stack", p))
    for parent, name in targets:
        child = getattr(parent, name)
        if type(child) in _LAYERS:
            example = _example_input(child)
            wrapper = QuantizedLayer(prepare_fx(nn.Sequential(copy.deepcopy(child)), qconfig,
                                                example_inputs=(example,)), child)
            setattr(parent, name, wrapper)
            prepared.append((wrapper, "graph", wrapper.graph))
            continue
        example = torch.zeros(1, _in_channels(child), 32, 32)
        p = prepare_fx(copy.deepcopy(child), qconfig, example_inputs=(example,))
        setattr(parent, name, p)
        prepared.append((parent, name, p))
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    for parent, name, p in prepared:
        setattr(parent, name, convert_fx(p))
    return model


class QuantizedLayer(nn.Module):
    """One int8 head layer: ``graph`` (the FX-quantized layer; float in, float out) with the float layer's shape
    attributes (``in_channels``, ``out_features``, ...), which some heads read in their ``forward``.

    The layer is traced inside an ``nn.Sequential`` so that FX calls it as a leaf module (tracing a root
    ``ConvTranspose2d``'s own ``forward`` fails on its output-size logic)."""

    _ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "in_features", "out_features")

    def __init__(self, graph: nn.Module, layer: nn.Module):
        super().__init__()
        self.graph = graph
        self.float_type = type(layer).__name__
        for a in self._ATTRS:
            if hasattr(layer, a):
                setattr(self, a, getattr(layer, a))

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)

    def extra_repr(self) -> str:
        return f"int8 {self.float_type}"


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), from the Linux CPU
    flags; False where they cannot be read."""
    from ..utils.env import cpu_flags

    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def quantized_engine() -> str:
    """The quantized engine the int8 layers are packed for: ``'onednn'`` on a CPU with AMX, else ``'x86'``.

    ``x86`` picks a library per operator and runs ``quantized::linear`` with fbgemm; oneDNN's int8 matmul uses
    AMX. On a 2-core Xeon with AMX the 2-fc box head at 1000 proposals took 46 ms with ``onednn`` against 62 ms with
    ``x86`` (``benchmarks/profile_call.py ours-int8 --modules``, two runs each), the other modules the same. Without
    AMX ``x86`` stays, as measured in docs/benchmarks.md."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx() and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return "x86"


def _qconfig_mapping():
    """PyTorch's x86 mapping; on a VNNI CPU with full-range (8-bit) activations.

    The x86 default observes activations with ``reduce_range=True`` (7 bits) because without VNNI the int8 kernels
    multiply-add pairs into saturating 16-bit sums (``vpmaddubsw``); VNNI accumulates in 32 bits, so the eighth
    bit is safe there and halves the activations' rounding step."""
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import HistogramObserver

    mapping = get_default_qconfig_mapping("x86")
    if not cpu_has_vnni():
        return mapping
    full = HistogramObserver.with_args(reduce_range=False)
    mapping.set_global(QConfig(activation=full, weight=mapping.global_qconfig.weight))
    for key, qconfig in list(mapping.object_type_qconfigs.items()):  # e.g. ConvTranspose2d's per-tensor weights
        partial = getattr(qconfig, "activation", None)
        if getattr(getattr(partial, "p", partial), "keywords", {}).get("reduce_range"):
            mapping.set_object_type(key, QConfig(activation=full, weight=qconfig.weight))
    return mapping


def _in_channels(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise ConfigError(f"TEST.QUANTIZE 'int8': {type(module).__name__} has no convolution")
