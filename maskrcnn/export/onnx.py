"""ONNX export of :class:`~maskrcnn.export.wrapper.ExportableMaskRCNN`, and runners for ONNX Runtime and OpenVINO.

The graph is produced by PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), for
which torchvision registers the symbolic functions of its operators: ``torchvision::nms`` becomes ONNX
``NonMaxSuppression`` and ``torchvision::roi_align`` becomes ``RoiAlign`` (opset 16+ carries the half-pixel
``aligned`` mode). Inputs and outputs:

* ``image``: ``(3, H, W)`` uint8 or float32 RGB (the wrapper's dtype), ``H`` and ``W`` dynamic;
* ``boxes (N, 4)`` float32, ``labels (N,)`` int64, ``scores (N,)`` float32, ``masks (N, 1, M, M)`` float32
  (or ``(N, 1, H, W)`` pasted), ``N`` dynamic.

The runners need the optional extras: ``pip install maskrcnn[onnx]`` (``onnx``, ``onnxruntime``) and
``pip install maskrcnn[openvino]``.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..ops._backend import use_backend
from .wrapper import ExportableMaskRCNN

__all__ = ["export_onnx", "OUTPUT_NAMES", "OnnxRuntimeModel", "OpenVINOModel", "DEFAULT_OPSET"]

#: RoiAlign's ``coordinate_transformation_mode`` (torchvision's ``aligned``) needs opset 16.
DEFAULT_OPSET = 17
OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")


def export_onnx(wrapper: ExportableMaskRCNN, example: Tensor, path: Union[str, os.PathLike],
                opset_version: int = DEFAULT_OPSET) -> str:
    """Export ``wrapper`` traced on ``example`` (one ``(3, H, W)`` image) to ``path``; returns the path.

    Raises ``ValueError`` for an opset below 16 (RoiAlign without the ``aligned`` mode).
    """
    if not isinstance(wrapper, ExportableMaskRCNN):
        raise TypeError(f"wrapper must be an ExportableMaskRCNN, got {type(wrapper).__name__}")
    if int(opset_version) < 16:
        raise ValueError(f"opset_version must be >= 16 (RoiAlign with coordinate_transformation_mode), "
                         f"got {opset_version}")
    names = list(OUTPUT_NAMES if wrapper.mask_on else OUTPUT_NAMES[:3])
    dynamic = {"image": {1: "height", 2: "width"}}
    dynamic.update({n: {0: "detections"} for n in names})
    if wrapper.mask_on and wrapper.paste_masks:
        dynamic["masks"] = {0: "detections", 2: "height", 3: "width"}
    path = os.fspath(path)
    with torch.no_grad(), use_backend("torchvision"), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(wrapper, (example,), path, dynamo=False, opset_version=int(opset_version),
                          input_names=["image"], output_names=names, dynamic_axes=dynamic)
    return path


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed; install it with `pip install maskrcnn[{extra}]`") from e


def _as_numpy(image: Union[Tensor, np.ndarray]) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, Tensor) else np.ascontiguousarray(image)


class OnnxRuntimeModel:
    """An exported ONNX model in ONNX Runtime (CPU).

    ``model(image)`` with ``image`` a ``(3, H, W)`` array or tensor of the exported dtype returns the outputs as
    a dict of NumPy arrays keyed by :data:`OUTPUT_NAMES`. ``num_threads`` sets ONNX Runtime's intra-op threads
    (0: its default).
    """

    def __init__(self, path: Union[str, os.PathLike], num_threads: int = 0):
        ort = _require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        if num_threads > 0:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {os.fspath(path)!r}")
        self.session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]

    def __call__(self, image: Union[Tensor, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.session.run(None, {"image": _as_numpy(image)})
        return dict(zip(self.output_names, outs))


class OpenVINOModel:
    """An exported ONNX model compiled by OpenVINO for the CPU.

    Args:
        path: the ``.onnx`` file.
        precision: ``"f32"`` or ``"bf16"`` (OpenVINO's ``INFERENCE_PRECISION_HINT``; bf16 needs a CPU with
            AVX512-BF16/AMX, otherwise OpenVINO runs f32).
        num_threads: ``INFERENCE_NUM_THREADS`` (0: OpenVINO's default).

    ``model(image)`` returns a dict of NumPy arrays keyed by :data:`OUTPUT_NAMES`.
    """

    PRECISIONS = ("f32", "bf16")

    def __init__(self, path: Union[str, os.PathLike], precision: str = "f32", num_threads: int = 0):
        ov = _require("openvino", "openvino")
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {precision!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ONNX file at {os.fspath(path)!r}")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if num_threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(core.read_model(os.fspath(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # An output may carry several tensor names (e.g. "masks" and the node's own); ours come first.
        self.output_names: Sequence[str] = [
            next((n for n in OUTPUT_NAMES if n in o.get_names()), o.get_any_name()) for o in self.compiled.outputs]

    def __call__(self, image: Union[Tensor, np.ndarray]) -> Dict[str, np.ndarray]:
        result = self.request.infer({0: _as_numpy(image)})
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}
