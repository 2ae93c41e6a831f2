"""Index samplers for training (infinite, sharded, resumable, aspect-grouped) and evaluation (contiguous shards).

Training order
--------------
:class:`InfiniteSampler` defines one global stream of dataset indices, the same for every world size::

    G[p] = perm_e[p mod n],   e = p // n,   perm_e = numpy.random.default_rng([seed, e]).permutation(n)

(``perm_e = arange(n)`` without shuffling). Rank ``r`` of ``world_size`` ``W`` takes the global positions
``r, r + W, r + 2W, ...``: the ranks interleave, their shards are disjoint, and together they cover the stream.
With ``B`` images per batch per rank, iteration ``k`` of rank ``r`` holds positions ``r + W (k B + j)``,
``j = 0..B-1``. Hence without aspect grouping one process with batch ``2`` and two processes with batch ``1`` see the
same images at every iteration (``{2k, 2k+1}``); in general ``W`` ranks with batch ``B`` see, at each iteration,
the ``W B`` consecutive positions ``W B k .. W B (k+1) - 1``. Resuming from iteration ``k`` is starting the sampler at
per-rank offset ``k B`` (``start``), which yields exactly what the uninterrupted run would have yielded.

:class:`GroupedBatchSampler` batches only images of the same aspect group (landscape/square vs portrait, or
torchvision's finer aspect bins with ``TRAIN.ASPECT_RATIO_GROUP_FACTOR``), in the order the images arrive from its
sampler; each rank groups its own shard. :class:`TrainingBatchSampler` combines the
two and tags every item with a per-sample seed for the random transforms; it resumes a grouped stream by replaying
the (pixel-free, cheap) index stream up to the start iteration.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import BatchSampler, Sampler

__all__ = [
    "InfiniteSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "TrainingBatchSampler",
    "aspect_bins",
    "aspect_group_of",
    "aspect_ratio_group_ids",
    "sample_seed",
]


def _check_shard(rank: int, world_size: int, who: str) -> None:
    if int(world_size) < 1:
        raise ValueError(f"{who}: world_size must be >= 1, got {world_size!r}")
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"{who}: rank must be in [0, world_size={world_size}), got {rank!r}")


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the random transforms of the item at global ``position`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class InfiniteSampler(Sampler[int]):
    """Endless stream of indices in ``[0, size)``, sharded across ranks (see the module docstring for the order).

    Args:
        size: dataset length.
        shuffle: a new permutation every epoch (else ``0, 1, ..., size-1`` repeated).
        seed: seed of the permutations; non-negative.
        rank, world_size: this process's shard.
        start: number of indices this rank has already consumed (resume offset).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if int(size) <= 0:
            raise ValueError(f"InfiniteSampler: size must be positive, got {size!r}")
        if int(seed) < 0:
            raise ValueError(f"InfiniteSampler: seed must be non-negative, got {seed!r}")
        if int(start) < 0:
            raise ValueError(f"InfiniteSampler: start must be non-negative, got {start!r}")
        _check_shard(rank, world_size, "InfiniteSampler")
        self.size, self.shuffle, self.seed = int(size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), int(start)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch ``epoch`` (a permutation of ``range(size)``)."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        position = self.rank + self.world_size * self.start
        epoch, order = -1, None
        while True:
            e, offset = divmod(position, self.size)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield int(order[offset])
            position += self.world_size


class InferenceSampler(Sampler[int]):
    """Contiguous shard ``[rank * size // W, (rank + 1) * size // W)`` of ``range(size)``, in order.

    Shards differ in length by at most one and concatenated in rank order they give ``0..size-1``.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if int(size) < 0:
            raise ValueError(f"InferenceSampler: size must be >= 0, got {size!r}")
        _check_shard(rank, world_size, "InferenceSampler")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.begin = self.rank * self.size // self.world_size
        self.end = (self.rank + 1) * self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


def aspect_bins(factor: int) -> np.ndarray:
    """Edges of torchvision's aspect-ratio (width / height) groups for ``--aspect-ratio-group-factor`` ``factor``
    (``2 ** linspace(-1, 1, 2 * factor + 1)``: ``2 * factor + 2`` groups, the outer two open-ended)."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"aspect bins need a factor >= 1, got {factor!r}")
    return 2.0 ** np.linspace(-1.0, 1.0, 2 * int(factor) + 1)


def aspect_group_of(width: np.ndarray, height: np.ndarray, factor: int = 0) -> np.ndarray:
    """Group ids of images of ``width`` x ``height``: with ``factor`` 0, 0 if width >= height else 1 (Detectron);
    with ``factor >= 1``, the index of ``width / height`` among :func:`aspect_bins` (torchvision's
    ``create_aspect_ratio_groups``: ``bisect_right`` of the edges)."""
    width, height = np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    if int(factor) == 0:
        return np.where(width >= height, 0, 1).astype(np.int64)
    return np.searchsorted(aspect_bins(factor), width / np.maximum(height, 1e-9), side="right").astype(np.int64)


def aspect_ratio_group_ids(dataset, factor: int = 0) -> List[int]:
    """Group id per item from ``dataset.get_image_info`` (no pixels read), as :func:`aspect_group_of` says:
    landscape/portrait for ``factor`` 0 (``TRAIN.ASPECT_RATIO_GROUP_FACTOR``), finer aspect bins above."""
    if not hasattr(dataset, "get_image_info"):
        raise TypeError(f"aspect grouping needs dataset.get_image_info(i); {type(dataset).__name__} has none")
    if int(factor) != factor or factor < 0:
        raise ValueError(f"aspect_ratio_group_ids: factor must be an integer >= 0, got {factor!r}")
    sizes = [dataset.get_image_info(i) for i in range(len(dataset))]
    width = np.array([int(info["width"]) for info in sizes], dtype=np.float64)
    height = np.array([int(info["height"]) for info in sizes], dtype=np.float64)
    return aspect_group_of(width, height, factor).tolist()


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches of ``batch_size`` indices that share a group id, formed in arrival order from ``sampler``.

    An index waits in its group's buffer until the buffer holds ``batch_size`` indices. When a finite sampler ends,
    the partly filled buffers are yielded (group order) unless ``drop_last``.
    """

    def __init__(self, sampler, group_ids: Sequence[int], batch_size: int, drop_last: bool = False):
        if int(batch_size) < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = {}
        for idx in self.sampler:
            try:
                group = self.group_ids[idx]
            except IndexError:
                raise IndexError(f"GroupedBatchSampler: sampler gave index {idx} but group_ids has "
                                 f"{len(self.group_ids)} entries") from None
            buf = buffers.setdefault(group, [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield list(buf)
                buf.clear()
        if not self.drop_last:
            for group in sorted(buffers):
                if buffers[group]:
                    yield list(buffers[group])


class TrainingBatchSampler:
    """Endless training batches of ``(dataset_index, sample_seed)`` keys for this rank, from ``start_iter`` on.

    ``sample_seed`` is :func:`sample_seed` ``(seed, r + W (k B + j))`` for slot ``j`` of iteration ``k``: without
    grouping that is the item's global stream position, so the random transforms (flips) of an image also agree
    across world sizes; with grouping it is still a deterministic function of (seed, rank, world size, batch size).

    Args:
        size: dataset length.
        batch_size: images per batch on this rank.
        group_ids: per-item aspect group (see :func:`aspect_ratio_group_ids`), or ``None`` for no grouping.
        seed, rank, world_size: as :class:`InfiniteSampler`.
        start_iter: first iteration to produce; iterating gives iterations ``start_iter, start_iter + 1, ...``
            exactly as an uninterrupted run would.
        shuffle: as :class:`InfiniteSampler`.
    """

    def __init__(self, size: int, batch_size: int, group_ids: Optional[Sequence[int]] = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_iter: int = 0, shuffle: bool = True):
        if int(batch_size) < 1:
            raise ValueError(f"TrainingBatchSampler: batch_size must be >= 1, got {batch_size!r}")
        if int(start_iter) < 0:
            raise ValueError(f"TrainingBatchSampler: start_iter must be >= 0, got {start_iter!r}")
        if group_ids is not None and len(group_ids) != int(size):
            raise ValueError(f"TrainingBatchSampler: group_ids has {len(group_ids)} entries for size {size}")
        _check_shard(rank, world_size, "TrainingBatchSampler")
        self.size, self.batch_size = int(size), int(batch_size)
        self.group_ids = None if group_ids is None else [int(g) for g in group_ids]
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.start_iter, self.shuffle = int(start_iter), bool(shuffle)
        # Fail early on bad sizes/seeds rather than in the first next().
        InfiniteSampler(self.size, self.shuffle, self.seed, self.rank, self.world_size)

    def index_batches(self) -> Iterator[List[int]]:
        """The batches of dataset indices, from ``start_iter`` on."""
        if self.group_ids is None:
            sampler = InfiniteSampler(self.size, self.shuffle, self.seed, self.rank, self.world_size,
                                      start=self.start_iter * self.batch_size)
            return iter(BatchSampler(sampler, self.batch_size, drop_last=True))
        sampler = InfiniteSampler(self.size, self.shuffle, self.seed, self.rank, self.world_size, start=0)
        grouped = GroupedBatchSampler(sampler, self.group_ids, self.batch_size)
        # Grouping makes batch k depend on the whole stream before it: replay the index stream (no data is read).
        return itertools.islice(iter(grouped), self.start_iter, None)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        B, W = self.batch_size, self.world_size
        for k, batch in enumerate(self.index_batches(), start=self.start_iter):
            yield [(idx, sample_seed(self.seed, self.rank + W * (k * B + j))) for j, idx in enumerate(batch)]
