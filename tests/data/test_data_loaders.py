import itertools
import json

import cv2
import numpy as np
import pytest
import torch

from maskrcnn.data.build import DatasetItemError, build_test_loader, build_train_loader
from maskrcnn.data.validate import UnreadableImagesError
from maskrcnn.data.catalog import ConcatDataset
from maskrcnn.data.collate import collate_fn
from maskrcnn.data.datasets.coco import COCODataset
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.data.transforms import hflip


def small(split="train", size=(40, 56), n=10):
    return SyntheticShapesDataset(split, num_images=n, image_size=size, max_object_size=20, min_object_size=6)


def take(it, n):
    return list(itertools.islice(it, n))


def _same_batches(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert len(ia) == len(ib)
        for x, y in zip(ia, ib):
            assert torch.equal(x, y)
        for x, y in zip(ta, tb):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_collate_fn():
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 2), {"a": 2})]
    images, targets = collate_fn(batch)
    assert isinstance(images, list) and [im.shape[-1] for im in images] == [5, 2]
    assert targets == [{"a": 1}, {"a": 2}]
    assert len(collate_fn([(1, 2, 3)])) == 3
    with pytest.raises(ValueError, match="item 1"):
        collate_fn([(1, 2), (1, 2, 3)])


def test_train_loader_is_endless_deterministic_and_flips_consistently():
    ds = small()
    batches = take(build_train_loader(ds, 2, num_workers=0, aspect_grouping=False, seed=3), 12)  # > 1 epoch
    assert all(len(images) == 2 and len(targets) == 2 for images, targets in batches)
    flipped = kept = 0
    for images, targets in batches:
        for image, target in zip(images, targets):
            ref_image, ref_target = ds[int(target["image_id"])]
            if torch.equal(image, ref_image):
                kept += 1
                assert torch.equal(target["boxes"], ref_target["boxes"])
            else:
                flipped += 1
                f_image, f_target = hflip(ref_image, ref_target)
                assert torch.equal(image, f_image)
                assert torch.equal(target["boxes"], f_target["boxes"]) and torch.equal(target["masks"],
                                                                                          f_target["masks"])
    assert flipped > 0 and kept > 0
    again = take(build_train_loader(ds, 2, num_workers=0, aspect_grouping=False, seed=3), 12)
    _same_batches(batches, again)
    # the global RNG plays no part
    torch.manual_seed(99)
    _same_batches(batches[:3], take(build_train_loader(ds, 2, aspect_grouping=False, seed=3), 3))


def test_train_loader_same_with_a_worker_and_resumes_exactly():
    ds = ConcatDataset([small(size=(40, 56)), small(size=(56, 40), split="val")])
    kwargs = dict(ims_per_batch=2, aspect_grouping=True, seed=1)
    main = take(build_train_loader(ds, num_workers=0, **kwargs), 8)
    worker = take(build_train_loader(ds, num_workers=1, **kwargs), 8)
    _same_batches(main, worker)
    for images, _ in main:   # aspect grouping: one orientation per batch
        assert len({tuple(im.shape) for im in images}) == 1
    resumed = take(build_train_loader(ds, num_workers=0, start_iter=5, **kwargs), 3)
    _same_batches(main[5:8], resumed)


def test_two_ranks_batch_one_see_what_one_rank_batch_two_sees():
    ds = small(n=7)
    one = take(build_train_loader(ds, 2, aspect_grouping=False, seed=5), 6)
    ranks = [take(build_train_loader(ds, 1, aspect_grouping=False, seed=5, rank=r, world_size=2), 6)
             for r in range(2)]
    for k in range(6):
        images, targets = one[k]
        assert torch.equal(images[0], ranks[0][k][0][0]) and torch.equal(images[1], ranks[1][k][0][0])
        assert torch.equal(targets[1]["boxes"], ranks[1][k][1][0]["boxes"])


def test_test_loader_shards_in_order():
    ds = small("val", n=7)
    seen = []
    for rank in range(2):
        for images, targets, indices in build_test_loader(ds, num_workers=0, rank=rank, world_size=2,
                                                          ims_per_batch=2):
            for image, target, index in zip(images, targets, indices):
                ref_image, ref_target = ds[index]
                assert torch.equal(image, ref_image) and torch.equal(target["masks"], ref_target["masks"])
                seen.append(index)
    assert seen == list(range(7))
    assert len(build_test_loader(ds, rank=0, world_size=2, ims_per_batch=2)) == 2   # indices 0..2


class _Broken(torch.utils.data.Dataset):
    classes = ["__background__", "x"]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            raise KeyError("boom in decoder")
        return torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 4, dtype=torch.uint8)}

    def get_image_info(self, i):
        return {"file_name": f"broken/img_{i}.png", "height": 4, "width": 4, "id": 100 + i}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_item_errors_name_index_and_file(num_workers):
    with pytest.raises(DatasetItemError) as info:
        list(build_test_loader(_Broken(), num_workers=num_workers))
    text = str(info.value)
    assert "dataset index 3" in text and "broken/img_3.png" in text and "image id 103" in text
    assert "KeyError" in text and "boom in decoder" in text


def test_worker_error_from_real_unreadable_image(tmp_path):
    (tmp_path / "ok.png").write_bytes(cv2.imencode(".png", np.zeros((6, 8, 3), np.uint8))[1].tobytes())
    (tmp_path / "bad.jpg").write_bytes(b"\x00not a jpeg")
    data = {"images": [{"id": 7, "file_name": "ok.png", "height": 6, "width": 8},
                       {"id": 9, "file_name": "bad.jpg", "height": 6, "width": 8}],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = COCODataset(str(tmp_path / "ann.json"), str(tmp_path))
    # validation (the default) refuses it before any worker starts
    with pytest.raises(UnreadableImagesError, match=r"bad\.jpg \(image id 9\)"):
        build_train_loader(ds, 2, num_workers=1, aspect_grouping=False, seed=0)
    loader = build_train_loader(ds, 2, num_workers=1, aspect_grouping=False, seed=0, validate=False)
    with pytest.raises(DatasetItemError) as info:
        next(loader)
    text = str(info.value)
    assert "dataset index 1" in text and "bad.jpg" in text and "image id 9" in text and "could not decode" in text


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="ims_per_batch"):
        build_train_loader(small(), 0)
    with pytest.raises(ValueError, match="empty list"):
        build_train_loader([], 2)
    with pytest.raises(ValueError, match="rank"):
        build_train_loader(small(), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_workers"):
        build_test_loader(small(), num_workers=-1)
