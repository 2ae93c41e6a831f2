import itertools

import numpy as np
import pytest

from maskrcnn.data.samplers import (GroupedBatchSampler, InferenceSampler, InfiniteSampler, TrainingBatchSampler,
                                    aspect_group_of, aspect_ratio_group_ids, sample_seed)


def take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def test_infinite_sampler_epochs_are_permutations():
    s = InfiniteSampler(7, seed=5)
    stream = take(s, 21)
    epochs = [stream[0:7], stream[7:14], stream[14:21]]
    for e in epochs:
        assert sorted(e) == list(range(7))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert take(InfiniteSampler(7, seed=5), 21) == stream
    assert take(InfiniteSampler(7, seed=6), 21) != stream
    assert take(InfiniteSampler(4, shuffle=False), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_infinite_sampler_shards_interleave_the_global_stream():
    world = take(InfiniteSampler(10, seed=1), 60)
    for W in (2, 3):
        shards = [take(InfiniteSampler(10, seed=1, rank=r, world_size=W), 60 // W) for r in range(W)]
        for r in range(W):
            assert shards[r] == world[r::W]
        # positions are disjoint and together cover the stream
        merged = [shards[p % W][p // W] for p in range(60)]
        assert merged == world
    # resuming at a per-rank offset continues the same shard
    assert take(InfiniteSampler(10, seed=1, rank=1, world_size=2, start=7), 5) == world[1::2][7:12]


def test_one_process_batch_two_equals_two_processes_batch_one():
    one = take(TrainingBatchSampler(9, 2, seed=4), 12)
    ranks = [take(TrainingBatchSampler(9, 1, seed=4, rank=r, world_size=2), 12) for r in range(2)]
    for k in range(12):
        assert one[k] == [ranks[0][k][0], ranks[1][k][0]]   # same images and the same per-sample seeds
    # and 2 ranks x batch 2 = 1 rank x batch 4 (positions 4k .. 4k+3)
    four = take(TrainingBatchSampler(9, 4, seed=4), 6)
    two = [take(TrainingBatchSampler(9, 2, seed=4, rank=r, world_size=2), 6) for r in range(2)]
    for k in range(6):
        assert sorted(four[k]) == sorted(two[0][k] + two[1][k])
        assert [four[k][j] for j in (0, 2)] == two[0][k]


def test_training_batches_resume_exactly():
    groups = [i % 3 == 0 for i in range(11)]
    for group_ids in (None, [int(g) for g in groups]):
        for rank, W in ((0, 1), (1, 2)):
            full = take(TrainingBatchSampler(11, 3, group_ids, seed=2, rank=rank, world_size=W), 20)
            resumed = take(TrainingBatchSampler(11, 3, group_ids, seed=2, rank=rank, world_size=W, start_iter=8), 12)
            assert resumed == full[8:20]
    assert sample_seed(2, 5) == sample_seed(2, 5) != sample_seed(2, 6)
    assert 0 <= sample_seed(2**40, 10**12) < 2**63


def test_grouped_batches_are_homogeneous_and_complete():
    group_ids = [0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1]
    order = [3, 1, 0, 5, 2, 8, 4, 6, 7, 10, 9]
    batches = list(GroupedBatchSampler(order, group_ids, 2))
    for b in batches[:-2]:
        assert len(b) == 2
    for b in batches:
        assert len({group_ids[i] for i in b}) == 1
    assert sorted(itertools.chain(*batches)) == sorted(order)
    # arrival order kept: the first batch completes when the second landscape image arrives
    assert batches[0] == [3, 0]
    dropped = list(GroupedBatchSampler(order, group_ids, 2, drop_last=True))
    assert all(len(b) == 2 for b in dropped) and len(dropped) == 5
    infinite = take(GroupedBatchSampler(InfiniteSampler(11, seed=0), group_ids, 3), 30)
    assert all(len({group_ids[i] for i in b}) == 1 and len(b) == 3 for b in infinite)
    with pytest.raises(IndexError, match="group_ids"):
        list(GroupedBatchSampler([20], group_ids, 2))


class _InfoOnly:
    """A dataset whose pixels must not be read by aspect grouping."""

    sizes = [(10, 20), (30, 10), (8, 8), (6, 5)]  # (height, width)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        raise AssertionError("aspect grouping read pixels")

    def get_image_info(self, i):
        h, w = self.sizes[i]
        return {"file_name": f"{i}.png", "height": h, "width": w, "id": i}


def test_aspect_groups_from_image_info():
    assert aspect_ratio_group_ids(_InfoOnly()) == [0, 1, 0, 1]
    with pytest.raises(TypeError, match="get_image_info"):
        aspect_ratio_group_ids([1, 2])


def test_fine_aspect_groups_are_torchvisions():
    """TRAIN.ASPECT_RATIO_GROUP_FACTOR k: torchvision's references' create_aspect_ratio_groups(k), written out here:
    bins = 2 ** linspace(-1, 1, 2k + 1), group = bisect_right(bins, width / height)."""
    import bisect
    assert aspect_ratio_group_ids(_InfoOnly(), 3) == [7, 0, 4, 3]  # w/h 2.0 (on the last edge), 1/3, 1.0, 5/6
    rng = np.random.default_rng(0)
    w, h = rng.integers(50, 600, 500), rng.integers(50, 600, 500)
    for k in (1, 2, 3, 5):
        bins = sorted((2 ** np.linspace(-1, 1, 2 * k + 1)).tolist())
        expected = [bisect.bisect_right(bins, float(a) / float(b)) for a, b in zip(w, h)]
        assert aspect_group_of(w, h, k).tolist() == expected
        assert set(expected) <= set(range(2 * k + 2))
    with pytest.raises(ValueError, match="factor must be an integer >= 0"):
        aspect_ratio_group_ids(_InfoOnly(), -1)


def test_inference_sampler_contiguous_shards():
    for n, W in ((10, 3), (2, 3), (7, 1), (0, 2)):
        shards = [list(InferenceSampler(n, r, W)) for r in range(W)]
        assert list(itertools.chain(*shards)) == list(range(n))
        lengths = [len(InferenceSampler(n, r, W)) for r in range(W)]
        assert lengths == [len(s) for s in shards] and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("make,match", [
    (lambda: InfiniteSampler(0), "size"),
    (lambda: InfiniteSampler(5, rank=2, world_size=2), "rank"),
    (lambda: InfiniteSampler(5, world_size=0), "world_size"),
    (lambda: InfiniteSampler(5, seed=-1), "seed"),
    (lambda: TrainingBatchSampler(5, 0), "batch_size"),
    (lambda: TrainingBatchSampler(5, 2, group_ids=[0, 1]), "group_ids"),
    (lambda: InferenceSampler(5, rank=-1, world_size=2), "rank"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_epoch_order_is_numpy_permutation():
    s = InfiniteSampler(6, seed=9)
    np.testing.assert_array_equal(s.epoch_order(3), np.random.default_rng([9, 3]).permutation(6))
    assert take(s, 24)[18:24] == s.epoch_order(3).tolist()
