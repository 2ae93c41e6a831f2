"""Both ``TEST.MASK_PASTE_METHOD`` values export: the in-graph dense paste and the user-side ``paste_masks`` give
the eager paste of that method, and a model with detectron2's paste exports to TorchScript and ONNX with the
eager model's detections (masks pasted by that method)."""
import os

import numpy as np
import pytest
import torch

from maskrcnn.cli.export import main
from maskrcnn.export import (ExportableMaskRCNN, compare_detections, eager_detections, paste_masks,
                             paste_masks_dense, trace_torchscript)
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.ops.grid_paste import paste_masks_grid_sample
from maskrcnn.ops.masks import paste_masks_in_image

from export_models import PHOTOS, REPO, assert_separated, fpn_cfg, report, scaled

PHOTO_DIR = os.path.join(REPO, "..", "shared", "data", "PennFudanPed-sample", "PNGImages")

# Sub-pixel boxes of 3 to 300 px, one partly outside the image, one wider than it, one of zero width.
BOXES = torch.tensor([[10.3, 12.7, 13.4, 15.1], [20.5, 5.25, 61.75, 70.0], [-8.0, 90.2, 30.6, 130.0],
                      [100.1, 0.0, 159.9, 119.6], [-50.0, -20.0, 250.0, 280.0], [40.0, 40.0, 40.0, 60.0]])


def _masks(n, m=28, seed=0):
    return torch.rand(n, 1, m, m, generator=torch.Generator().manual_seed(seed))


def test_dense_detectron2_paste_equals_grid_sample():
    masks = _masks(len(BOXES))
    ref = paste_masks_grid_sample(masks, BOXES, (120, 160))
    dense = paste_masks_dense(masks, BOXES, (120, 160), method="detectron2")
    assert dense.shape == ref.shape == (len(BOXES), 1, 120, 160)
    torch.testing.assert_close(dense, ref, rtol=0, atol=2e-6)
    assert float(ref[1].sum()) > 100 and float(ref[5].abs().sum()) == 0.0  # something pasted; zero width: nothing
    # Traced with a tensor size, as inside the exported graph, for another image size.
    dense = paste_masks_dense(masks, BOXES, torch.tensor([90, 200]), method="detectron2")
    torch.testing.assert_close(dense, paste_masks_grid_sample(masks, BOXES, (90, 200)), rtol=0, atol=2e-6)


def test_user_side_paste_follows_the_method():
    masks, boxes = _masks(4, seed=1), BOXES[:4]
    for method, ref in (("detectron2", paste_masks_grid_sample(masks, boxes, (120, 160))),
                        ("torchvision", paste_masks_in_image(masks, boxes, (120, 160), padding=1))):
        out = paste_masks(masks.numpy(), boxes.numpy(), (120, 160), method=method, threshold=0.5)
        assert isinstance(out, np.ndarray) and out.dtype == bool
        np.testing.assert_array_equal(out, (ref > 0.5).numpy())
        torch.testing.assert_close(paste_masks(masks, boxes, (120, 160), method=method), ref, rtol=0, atol=1e-6)
    # The two methods differ on small sub-pixel boxes (the reason the choice exists).
    assert not np.array_equal(paste_masks(masks.numpy(), boxes.numpy(), (120, 160), method="detectron2") > 0.5,
                              paste_masks(masks.numpy(), boxes.numpy(), (120, 160)) > 0.5)


def test_unknown_method_names_the_key():
    with pytest.raises(ValueError, match="TEST.MASK_PASTE_METHOD"):
        paste_masks(_masks(1).numpy(), BOXES[:1].numpy(), (10, 10), method="opencv")
    with pytest.raises(ValueError, match="TEST.MASK_PASTE_METHOD"):
        paste_masks_dense(_masks(1), BOXES[:1], (10, 10), method="nearest")


@pytest.fixture(scope="module")
def d2_paste_model():
    torch.manual_seed(0)
    cfg = fpn_cfg()
    cfg.merge_from_list(["TEST.MASK_PASTE_METHOD", "detectron2"])
    return scaled(Generalized_RCNN(cfg)), cfg


def _check(model, image, boxes, labels, scores, masks, tag):
    ref = eager_detections(model, image)
    assert_separated(ref)
    diff = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks},
                              image_size=image.shape[-2:], mask_paste_method="detectron2")
    report(tag, "fpn", PHOTOS[1], diff)
    assert diff.within(), str(diff)
    return diff


def test_torchscript_with_detectron2_paste(d2_paste_model, photos):
    model, _ = d2_paste_model
    assert model.preprocess.mask_paste_method == "detectron2"
    image = photos[1]
    for pasted in (False, True):
        wrapper = ExportableMaskRCNN(model, paste_masks=pasted)
        assert wrapper.mask_paste_method == "detectron2"
        traced = trace_torchscript(wrapper, photos[0])
        with torch.no_grad():
            boxes, labels, scores, masks = traced(image)
        if pasted:
            assert masks.shape[-2:] == image.shape[-2:]
        _check(model, image, boxes, labels, scores, masks, "ts-d2paste" + ("-pasted" if pasted else ""))
    # Pasted the torchvision way, the same M x M masks would differ from the model's: the method matters.
    wrapper = ExportableMaskRCNN(model)
    with torch.no_grad():
        boxes, labels, scores, masks = wrapper(image)
    ref = eager_detections(model, image)
    wrong = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks},
                               image_size=image.shape[-2:], mask_paste_method="torchvision")
    right = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks},
                               image_size=image.shape[-2:], mask_paste_method="detectron2")
    assert wrong.min_mask_iou < right.min_mask_iou


def test_onnx_with_detectron2_paste_in_graph(d2_paste_model, photos, tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install maskrcnn[onnx])")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install maskrcnn[onnx])")
    from maskrcnn.export import OnnxRuntimeModel
    from maskrcnn.export.onnx import export_onnx

    model, _ = d2_paste_model
    path = export_onnx(ExportableMaskRCNN(model, paste_masks=True), photos[0], tmp_path / "d2paste.onnx")
    out = OnnxRuntimeModel(path)(photos[1])
    assert tuple(out["masks"].shape[-2:]) == tuple(photos[1].shape[-2:])
    _check(model, photos[1], out["boxes"], out["labels"], out["scores"], out["masks"], "onnx-d2paste-pasted")


def test_cli_prints_how_to_paste(d2_paste_model, tmp_path, capsys):
    model, cfg = d2_paste_model
    ckpt, cfg_file = tmp_path / "model.pth", tmp_path / "cfg.yaml"
    torch.save({"model": model.state_dict(), "iteration": 0}, ckpt)
    cfg_file.write_text(cfg.dump())
    rc = main(["--cfg", str(cfg_file), "--load_ckpt", str(ckpt), "--format", "torchscript",
               "--output", str(tmp_path / "m.ts"), "--example", os.path.join(PHOTO_DIR, PHOTOS[0] + ".png"),
               "--check", os.path.join(PHOTO_DIR, PHOTOS[1] + ".png")])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0, printed
    assert "paste_masks(masks, boxes, (H, W), method='detectron2')" in printed
    assert "outside tolerance" not in printed
