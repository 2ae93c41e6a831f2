"""Exporting a trained Mask R-CNN (FPN or C4) to TorchScript, ONNX and ``torch.export``.

Every format wraps the model in :class:`ExportableMaskRCNN`: one ``(3, H, W)`` RGB image (uint8 0..255 or float32
0..1, any size) in; ``boxes (N, 4)`` (x1y1x2y2, input pixels), ``labels (N,)`` (1..K), ``scores (N,)`` and
``masks`` (``(N, 1, M, M)`` probabilities, see :func:`paste_masks`, or pasted ``(N, 1, H, W)``) out.

    from maskrcnn.export import export_model
    export_model("configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", "model_final.pth", "onnx", "model.onnx")

Formats: ``"torchscript"`` (traced; load with ``torch.jit.load`` after ``import torchvision``), ``"onnx"`` (run
it with :class:`OnnxRuntimeModel` or :class:`OpenVINOModel`, or any ONNX runtime with ``RoiAlign`` and
``NonMaxSuppression``), ``"export"`` (``torch.export``, see :mod:`maskrcnn.export.torch_export`).

int8: with ``TEST.QUANTIZE int8`` in the model's config, :func:`export_model` quantizes the model
(:mod:`maskrcnn.engine.quantize`, calibrated on ``calib_images``) before tracing; TorchScript only (the traced
graph keeps PyTorch's quantized x86 operators; ONNX and ``torch.export`` are refused with a ``ValueError``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .equivalence import DetectionDiff, compare_detections, eager_detections
from .onnx import OnnxRuntimeModel, OpenVINOModel, export_onnx
from .paste import paste_masks, paste_masks_dense
from .torch_export import export_program, load_program
from .torchscript import load_torchscript, trace_torchscript
from .wrapper import INPUT_DTYPES, ExportableMaskRCNN

__all__ = [
    "FORMATS", "ExportableMaskRCNN", "export_model", "build_model_for_export", "example_image", "quantize_for_export",
    "trace_torchscript", "load_torchscript", "export_onnx", "OnnxRuntimeModel", "OpenVINOModel",
    "export_program", "load_program", "paste_masks", "paste_masks_dense", "compare_detections",
    "eager_detections", "DetectionDiff", "INPUT_DTYPES",
]

#: Accepted ``format`` names.
FORMATS = ("torchscript", "onnx", "export")


def build_model_for_export(model_or_cfg, weights: Union[str, os.PathLike, None] = None,
                           overrides: Sequence[str] = ()) -> nn.Module:
    """A ``Generalized_RCNN`` in eval mode: ``model_or_cfg`` is a model, a config (``CfgNode``) or a config
    file path; ``overrides`` are ``KEY VALUE`` pairs merged into the config; ``weights`` a checkpoint (any
    format :func:`maskrcnn.utils.checkpoint.load_ckpt` reads)."""
    from ..modeling.generalized_rcnn import Generalized_RCNN

    if isinstance(model_or_cfg, nn.Module):
        if overrides:
            raise ValueError("config overrides need a config, not a built model")
        model = model_or_cfg
    else:
        from ..config import get_cfg

        if isinstance(model_or_cfg, (str, os.PathLike)):
            from ..config import ConfigError
            from ..config.paths import resolve_config_path

            try:  # a file, or a packaged config name (as Predictor and the tools take)
                path = resolve_config_path(os.fspath(model_or_cfg))
            except ConfigError as e:
                raise FileNotFoundError(str(e)) from None
            cfg = get_cfg()
            cfg.merge_from_file(path)
        else:
            cfg = model_or_cfg.clone()
            cfg.defrost()
        if len(overrides) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {list(overrides)}")
        cfg.merge_from_list(list(overrides))
        model = Generalized_RCNN(cfg)
    if weights is not None:
        from ..utils.checkpoint import load_ckpt

        load_ckpt(model, os.fspath(weights))
    return model.eval()


def quantize_for_export(model: nn.Module, format: str, calib_images: Optional[Sequence[Tensor]]) -> nn.Module:
    """Apply ``TEST.QUANTIZE`` of ``model.cfg`` (nothing when it is ``''`` or already applied): the BN fold and
    int8 quantization of :func:`maskrcnn.engine.speed.prepare_for_inference`, without the oneDNN fused blocks or
    channels-last (a traced graph keeps neither), calibrated on ``calib_images``."""
    from ..config import ConfigError
    from ..engine.quantize import is_quantized

    mode = str(getattr(getattr(getattr(model, "cfg", None), "TEST", None), "QUANTIZE", "") or "")
    if not mode or is_quantized(model):
        return model
    if format != "torchscript":
        raise ValueError(f"TEST.QUANTIZE = {mode!r} exports with format 'torchscript' only (got {format!r}): "
                         "ONNX and torch.export have no counterpart for PyTorch's quantized x86 operators")
    if not calib_images:
        raise ConfigError(f"TEST.QUANTIZE = {mode!r} needs calibration images to export: pass calib_images= "
                          "(maskrcnn-export --calib IMAGE ...), a few images of your data")
    from ..engine.speed import prepare_for_inference

    images = [im.float() / 255.0 if im.dtype == torch.uint8 else im.float() for im in calib_images]
    return prepare_for_inference(model, fuse_activations=False, channels_last=False, amp="", compile_body=False,
                                 calib_images=images)


def example_image(model: nn.Module, dtype: torch.dtype = torch.uint8, seed: int = 0) -> Tensor:
    """A ``(3, H, W)`` noise image at the model's test size (4:3), to trace with when no photo is given."""
    pre = model.preprocess
    h = int(pre.test_min_size)
    w = min(int(round(h * 4 / 3)), int(pre.test_max_size))
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return image if dtype == torch.uint8 else image.float() / 255.0


def export_model(model_or_cfg, weights: Union[str, os.PathLike, None], format: str,
                 output: Union[str, os.PathLike], example: Optional[Tensor] = None,
                 input_dtype: Union[str, torch.dtype] = "uint8", paste_masks: bool = False,
                 overrides: Sequence[str] = (), opset_version: Optional[int] = None,
                 calib_images: Optional[Sequence[Tensor]] = None) -> str:
    """Export a trained Mask R-CNN to ``output``; returns the written path.

    Args:
        model_or_cfg, weights, overrides: see :func:`build_model_for_export`.
        format: one of :data:`FORMATS`.
        example: the ``(3, H, W)`` image traced (default :func:`example_image`); the exported model accepts any
            size, but a real photo exercises the same operators with realistic detection counts.
        input_dtype: ``"uint8"`` (RGB 0..255) or ``"float32"`` (RGB 0..1), the exported model's input.
        paste_masks: output pasted ``(N, 1, H, W)`` masks instead of ``(N, 1, M, M)`` probabilities.
        opset_version: ONNX opset (default :data:`maskrcnn.export.onnx.DEFAULT_OPSET`).
        calib_images: with ``TEST.QUANTIZE int8``: a few ``(3, H, W)`` images of your data (uint8 RGB, or float RGB
            in [0, 1]) to calibrate the int8 ranges; the model (when one is passed) is quantized in place.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(input_dtype, str):
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {sorted(INPUT_DTYPES)}, got {input_dtype!r}")
        input_dtype = INPUT_DTYPES[input_dtype]
    model = build_model_for_export(model_or_cfg, weights, overrides)
    quantize_for_export(model, format, calib_images)
    wrapper = ExportableMaskRCNN(model, input_dtype=input_dtype, paste_masks=paste_masks)
    if example is None:
        example = example_image(model, input_dtype)
    elif example.dtype != input_dtype:
        raise TypeError(f"example image has dtype {example.dtype} but input_dtype is {input_dtype}")
    output = os.fspath(output)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    if format == "torchscript":
        trace_torchscript(wrapper, example, output)
    elif format == "onnx":
        kwargs = {} if opset_version is None else {"opset_version": int(opset_version)}
        export_onnx(wrapper, example, output, **kwargs)
    else:
        export_program(wrapper, example, output)
    return output
