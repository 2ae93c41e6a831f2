"""ONNX export, run in ONNX Runtime and OpenVINO on the CPU, gives the eager model's detections on real photos
(FPN and C4, two sizes). Skipped only when the optional runtimes (extras ``onnx`` / ``openvino``) are absent."""
import pytest
import torch

from maskrcnn.export import (ExportableMaskRCNN, OnnxRuntimeModel, OpenVINOModel, compare_detections,
                             eager_detections)
from maskrcnn.export.onnx import export_onnx

from export_models import PHOTOS, assert_separated, report

pytest.importorskip("onnx", reason="onnx not installed (pip install maskrcnn[onnx])")


def _onnx_file(model, photos, tmp_path, arch):
    wrapper = ExportableMaskRCNN(model, input_dtype=torch.uint8)
    return export_onnx(wrapper, photos[0], tmp_path / f"{arch}.onnx")


def _check(model, photos, runner, fmt, arch):
    for name, image in zip(PHOTOS, photos):
        ref = eager_detections(model, image)
        assert_separated(ref)
        out = runner(image)
        assert set(out) == {"boxes", "labels", "scores", "masks"}
        diff = compare_detections(ref, out, image_size=image.shape[-2:])
        report(fmt, arch, name, diff)
        assert diff.within(), str(diff)


@pytest.fixture(scope="module")
def onnx_files(fpn_model, c4_model, photos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    return {"fpn": _onnx_file(fpn_model, photos, tmp, "fpn"), "c4": _onnx_file(c4_model, photos, tmp, "c4")}


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_onnxruntime_matches_eager(arch, onnx_files, fpn_model, c4_model, photos):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install maskrcnn[onnx])")
    model = {"fpn": fpn_model, "c4": c4_model}[arch]
    _check(model, photos, OnnxRuntimeModel(onnx_files[arch]), "onnxruntime", arch)


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_openvino_matches_eager(arch, onnx_files, fpn_model, c4_model, photos):
    pytest.importorskip("openvino", reason="openvino not installed (pip install maskrcnn[openvino])")
    model = {"fpn": fpn_model, "c4": c4_model}[arch]
    _check(model, photos, OpenVINOModel(onnx_files[arch], precision="f32"), "openvino", arch)


def test_onnx_graph_uses_standard_detection_ops(onnx_files):
    import onnx

    ops = {n.op_type for n in onnx.load(onnx_files["fpn"]).graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "Resize"} <= ops


def test_opset_below_16_is_refused(fpn_model, photos, tmp_path):
    with pytest.raises(ValueError, match="opset_version must be >= 16"):
        export_onnx(ExportableMaskRCNN(fpn_model), photos[0], tmp_path / "m.onnx", opset_version=13)
