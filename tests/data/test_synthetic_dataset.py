import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from maskrcnn.data.datasets.synthetic import SHAPES, SyntheticShapesDataset


def _assert_items_equal(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_defaults_and_contract():
    train, val = SyntheticShapesDataset("train"), SyntheticShapesDataset("val")
    assert len(train) == 512 and len(val) == 64
    assert train.classes == ["__background__", "rectangle", "ellipse", "triangle"]
    image, t = train[5]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    n = len(t["labels"])
    assert 1 <= n <= 4
    assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8 and t["masks"].shape == (n, 128, 128)
    assert t["area"].dtype == torch.float32 and t["iscrowd"].tolist() == [0] * n
    assert t["image_id"].dtype == torch.int64 and int(t["image_id"]) == 5
    assert train.get_image_info(5) == {"file_name": "synthetic/train/000005.png", "height": 128, "width": 128, "id": 5}
    with pytest.raises(IndexError):
        train[512]


def test_deterministic_from_seed_split_index():
    a = SyntheticShapesDataset("train", seed=3)
    b = SyntheticShapesDataset("train", seed=3)
    for i in (7, 0, 31):  # out of order on purpose
        _assert_items_equal(a[i], b[i])
    torch.manual_seed(123)  # global RNG state must not matter
    _assert_items_equal(a[7], b[7])
    assert not torch.equal(a[7][0], SyntheticShapesDataset("train", seed=4)[7][0])
    assert not torch.equal(a[7][0], SyntheticShapesDataset("val", seed=3)[7][0])
    assert not torch.equal(a[7][0], a[8][0])


def test_masks_exact_tight_and_visible():
    ds = SyntheticShapesDataset("train", num_images=40, num_classes=6, seed=1)
    seen_labels = set()
    occluded = 0
    for i in range(len(ds)):
        image, t = ds[i]
        _, raw = ds.generate(i)
        masks = t["masks"]
        assert int(masks.flatten(1).sum(1).min()) > 0
        # boxes are the tight boxes of the visible masks (torchvision's masks_to_boxes has inclusive x2, y2)
        assert torch.equal(t["boxes"], masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert torch.equal(t["area"], masks.flatten(1).sum(1).float())
        # visible parts are disjoint, inside the full shape, and keep >= 30% of it
        assert int(masks.sum(0).max()) <= 1
        full = torch.from_numpy(raw["full_masks"])
        assert bool((masks <= full).all())
        ratio = masks.flatten(1).sum(1).float() / full.flatten(1).sum(1).float()
        assert float(ratio.min()) >= 0.3
        occluded += int((ratio < 1).sum())
        seen_labels.update(t["labels"].tolist())
        # pixels: inside a mask the instance's saturated class colour, elsewhere a desaturated background
        rgb = (image * 255).permute(1, 2, 0)
        spread = rgb.max(-1).values - rgb.min(-1).values
        fg = masks.sum(0).bool()
        assert float(spread[~fg].max()) < 60
        assert float(spread[fg].min()) > 90
        for m, label in zip(masks.bool(), t["labels"].tolist()):
            colour = torch.tensor(SHAPES[label - 1][1], dtype=torch.float32)
            assert float((rgb[m] - colour).abs().max()) <= 36
    assert seen_labels == set(range(1, 7))
    assert occluded > 0  # occlusion does happen


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="test"), "split"),
    (dict(num_classes=7), "num_classes"),
    (dict(num_images=0), "num_images"),
    (dict(image_size=(8, 8)), "image_size"),
    (dict(min_object_size=30, max_object_size=20), "min_object_size"),
    (dict(min_visible=0.0), "min_visible"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapesDataset(**kwargs)


def test_sizes_and_counts_vary():
    ds = SyntheticShapesDataset("val", max_objects=4)
    counts, sides = set(), []
    for i in range(len(ds)):
        _, raw = ds.generate(i)
        counts.add(len(raw["labels"]))
        full = raw["full_masks"]
        for m in full:
            ys, xs = np.nonzero(m)
            sides.append(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    assert counts == {1, 2, 3, 4}
    assert min(sides) <= 20 and max(sides) >= 50 and max(sides) <= 60
