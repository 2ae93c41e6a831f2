import pickle

import torch
from torch.utils.data import Dataset

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.cache import CachedDataset
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset


class CountingDataset(Dataset):
    """Items of a synthetic set; counts the reads. Image ``i`` has ``k / 255`` pixels (as decoded from a file)
    except for odd ``i`` when ``inexact`` (the built-in set's noisy floats, stored as float)."""

    classes = ("a", "b", "c")

    def __init__(self, n=6, inexact=False):
        self.inner = SyntheticShapesDataset(num_images=n, seed=3)
        self.reads = 0
        self.inexact = inexact

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        image, target = self.inner[i]
        if not (self.inexact and i % 2):
            image = image.mul(255).round_().to(torch.uint8).float().div_(255)
        return image, target

    def get_image_info(self, i):
        return self.inner.get_image_info(i)


def _equal(a, b):
    assert torch.equal(a[0], b[0]) and a[0].dtype == b[0].dtype
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        va, vb = a[1][k], b[1][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k


def test_items_equal_and_read_once():
    ref, data = CountingDataset(inexact=True), CountingDataset(inexact=True)
    cached = CachedDataset(data, max_mb=64)
    for _ in range(3):
        for i in range(len(cached)):
            _equal(cached[i], ref[i])
    assert data.reads == len(data) and cached.kept() == len(data)
    # pixels that are k/255 are kept as uint8 (a quarter of the float bytes), the others as float
    kinds = {i: cached._items[i][1] for i in range(len(data))}
    assert kinds == {i: i % 2 == 0 for i in range(len(data))}
    assert cached.classes == data.classes and cached.get_image_info(0) == data.get_image_info(0)


def test_caller_changes_do_not_reach_the_cache():
    cached = CachedDataset(CountingDataset(), max_mb=64)
    first = cached[0]
    image, target = cached[0]
    image.zero_()
    target["boxes"][:] = -1
    target["labels"] = None
    _equal(cached[0], first)


def test_memory_limit_keeps_what_fits():
    data = CountingDataset(n=6)
    two = CachedDataset(CountingDataset(n=6), max_mb=64)
    two[0], two[1]
    cached = CachedDataset(data, max_mb=(two.nbytes + 1) / 2 ** 20)
    for i in range(6):
        cached[i]
    assert cached.kept() == 2 and cached.nbytes <= cached.max_bytes
    for i in range(6):
        cached[i]
    assert data.reads == 6 + 4
    assert "2 items kept" in repr(cached)


def test_bad_limit_and_pickling():
    import pytest

    with pytest.raises(ValueError, match="max_mb"):
        CachedDataset(CountingDataset(), 0)
    cached = CachedDataset(CountingDataset(n=2), 8)
    cached[0]
    clone = pickle.loads(pickle.dumps(cached))
    _equal(clone[0], cached[0])


def test_train_loader_with_cache_gives_the_same_batches():
    plain = build_train_loader(CountingDataset(n=8), ims_per_batch=2, seed=5, validate=False)
    data = CountingDataset(n=8)
    cached = build_train_loader(data, ims_per_batch=2, seed=5, validate=False, cache_mb=64)
    for _ in range(12):  # three epochs: flips differ per epoch, the cache holds the unflipped items
        (ia, ta), (ib, tb) = next(plain), next(cached)
        for a, b, x, y in zip(ia, ib, ta, tb):
            _equal((a, x), (b, y))
    assert data.reads == 8
    plain.close()
    cached.close()
