"""benchmarks/trained.py's data in torchvision's conventions (no training, no model)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import trained  # noqa: E402


def test_synthetic_images_are_torchvision_targets():
    (image, target), = trained.synthetic_images("val", [0])
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.5
    n = len(target["labels"])
    assert n >= 1 and target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 128, 128)
    assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
    b = target["boxes"]
    assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
    # Each box encloses its mask (x1y1x2y2 pixels).
    for box, mask in zip(b, target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert float(xs.min()) >= float(box[0]) - 1 and float(xs.max()) <= float(box[2])
        assert float(ys.min()) >= float(box[1]) - 1 and float(ys.max()) <= float(box[3])
