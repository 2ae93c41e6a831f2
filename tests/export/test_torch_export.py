"""``torch.export`` (dynamic height and width) gives the eager model's detections on real photos."""
import pytest
import torch

from maskrcnn.export import ExportableMaskRCNN, compare_detections, eager_detections, export_program, load_program

from export_models import PHOTOS, assert_separated, report

pytestmark = pytest.mark.slow  # one export takes ~40 s on a shared 2-core CPU


def test_fpn_exported_program_matches_eager(fpn_model, photos, tmp_path):
    path = tmp_path / "fpn.pt2"
    export_program(ExportableMaskRCNN(fpn_model), photos[0], path)
    program = load_program(path).module()
    for name, image in zip(PHOTOS, photos):
        ref = eager_detections(fpn_model, image)
        assert_separated(ref)
        with torch.no_grad():
            boxes, labels, scores, masks = program(image)
        diff = compare_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks},
                                  image_size=image.shape[-2:])
        report("torch.export", "fpn", name, diff)
        assert diff.within(), str(diff)
