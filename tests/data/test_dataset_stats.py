"""Dataset statistics: exact figures on a hand-made set, the same from a COCO json (no pixels read) as from the
items, crowd regions and empty images counted apart."""
import numpy as np
import pytest
import torch

from maskrcnn.data.catalog import build_dataset
from maskrcnn.data.datasets.synthetic_family import SyntheticFamilyDataset
from maskrcnn.data.export_coco import export_coco
from maskrcnn.data.stats import compute_dataset_stats


class _Toy(torch.utils.data.Dataset):
    classes = ["__background__", "a", "b"]

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        (h, w), boxes, labels, crowd = self.items[i]
        n = len(labels)
        return torch.zeros(3, h, w), {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                                      "labels": torch.tensor(labels, dtype=torch.int64),
                                      "iscrowd": torch.tensor(crowd, dtype=torch.int64)}


def test_exact_figures():
    toy = _Toy([((100, 200), [[0, 0, 10, 40], [5, 5, 25, 15], [0, 0, 50, 50]], [1, 2, 2], [0, 0, 1]),
                ((60, 60), [], [], []),
                ((80, 40), [[10, 10, 30, 30]], [1], [0])])
    s = compute_dataset_stats(toy)
    assert s.num_images == 3 and s.images_read == 3 and s.num_classes == 2
    assert s.crowd_regions == 1 and s.empty_images == 1
    assert s.objects_per_image.tolist() == [2, 0, 1] and s.class_counts.tolist() == [2, 1]
    np.testing.assert_allclose(s.box_sizes, [20.0, np.sqrt(200.0), 20.0])
    np.testing.assert_allclose(s.aspect_ratios, [4.0, 0.5, 1.0])
    np.testing.assert_allclose(s.relative_box_sizes(), [0.2, np.sqrt(200.0) / 100, 0.5])
    lines = s.describe()
    assert lines[0].startswith("3 images (3 read), 2 classes, 3 objects, 1 crowd regions, 1 empty images")
    assert any(line.startswith("objects per class: a 2, b 1") for line in lines)


def test_coco_json_path_matches_items_and_subsampling(tmp_path):
    ds = SyntheticFamilyDataset("crowd", "train", num_images=10)
    path = export_coco(ds, str(tmp_path))
    coco = build_dataset(f"coco:{path}:{tmp_path}/images", "unused")
    a, b = compute_dataset_stats(ds), compute_dataset_stats(coco)
    np.testing.assert_allclose(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.image_hw, b.image_hw)
    assert (a.crowd_regions, a.empty_images, a.class_counts.tolist()) == (b.crowd_regions, b.empty_images,
                                                                          b.class_counts.tolist())
    assert a.crowd_regions >= 1
    half = compute_dataset_stats(coco, max_images=5)
    assert half.images_read == 5 and half.num_images == 10


def test_no_objects_is_an_error():
    with pytest.raises(ValueError, match="no \\(non-crowd\\) object"):
        compute_dataset_stats(_Toy([((10, 10), [], [], [])]))
