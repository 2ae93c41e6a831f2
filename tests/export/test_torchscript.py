"""TorchScript (traced) export gives the eager model's detections on real photos, FPN and C4, at two sizes."""
import pytest
import torch

from maskrcnn.export import (ExportableMaskRCNN, compare_detections, eager_detections, load_torchscript,
                             trace_torchscript)

from export_models import PHOTOS, assert_separated, report


def _check(model, photos, tmp_path, arch):
    wrapper = ExportableMaskRCNN(model, input_dtype=torch.uint8)
    path = tmp_path / f"{arch}.ts"
    trace_torchscript(wrapper, photos[0], path)
    traced = load_torchscript(path)
    for name, image in zip(PHOTOS, photos):
        ref = eager_detections(model, image)
        assert_separated(ref)
        with torch.no_grad():
            boxes, labels, scores, masks = traced(image)
        m = model.roi_heads.mask_resolution
        assert masks.shape[1:] == (1, m, m)
        diff = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks},
                                  image_size=image.shape[-2:])
        report("torchscript", arch, name, diff)
        assert diff.within(), str(diff)


def test_fpn_trace_matches_eager(fpn_model, photos, tmp_path):
    _check(fpn_model, photos, tmp_path, "fpn")


def test_c4_trace_matches_eager(c4_model, photos, tmp_path):
    _check(c4_model, photos, tmp_path, "c4")


def test_float_input_and_pasted_masks(fpn_model, photos):
    wrapper = ExportableMaskRCNN(fpn_model, input_dtype=torch.float32, paste_masks=True)
    image = photos[1].float() / 255
    traced = trace_torchscript(wrapper, photos[0].float() / 255)
    ref = eager_detections(fpn_model, image)
    with torch.no_grad():
        boxes, labels, scores, masks = traced(image)
    assert masks.shape[-2:] == image.shape[-2:]
    diff = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
    report("ts-pasted", "fpn", PHOTOS[1], diff)
    assert diff.within(), str(diff)


def test_wrong_input_is_explained(fpn_model, photos):
    wrapper = ExportableMaskRCNN(fpn_model, input_dtype=torch.uint8)
    with pytest.raises(TypeError, match="built for torch.uint8"):
        wrapper(photos[0].float())
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        wrapper(photos[0][None])
