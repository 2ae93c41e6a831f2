"""Data loaders: an endless, sharded, resumable training stream and an in-order sharded test pass.

Both wrap the dataset so that an exception raised while loading item ``i`` (in the main process or in a worker)
reaches the caller as a :class:`DatasetItemError` naming the dataset index and the image file, with the original
exception's type, message and (from workers) traceback in its text.

Training randomness (horizontal flips, a random resize size) is drawn from a ``torch.Generator`` seeded per sample by
:class:`~maskrcnn.data.samplers.TrainingBatchSampler`, never from worker or global RNG state, so a run is reproducible
for a given ``seed`` whatever ``num_workers`` is, and resuming at ``start_iter`` replays exactly the batches and
flips the uninterrupted run would have produced.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from .catalog import ConcatDataset
from .collate import collate_fn
from .samplers import InferenceSampler, TrainingBatchSampler, aspect_ratio_group_ids
from .transforms import Compose, RandomHorizontalFlip

__all__ = ["DatasetItemError", "LoaderDataset", "LoaderIterator", "build_train_loader", "build_test_loader"]


class DatasetItemError(RuntimeError):
    """Loading one dataset item failed; the message names the index, the image file and the original error."""


class LoaderDataset(Dataset):
    """Wraps a dataset for the loaders: error reporting, seeded transforms, optional index in the output.

    ``__getitem__`` accepts a dataset index or an ``(index, sample_seed)`` pair (from the training batch sampler);
    ``transforms`` are called as ``t(image, target, generator=g)`` with ``g`` seeded from ``sample_seed``
    (``None`` when no seed is given).

    Args:
        dataset: the dataset (items ``(image, target)``).
        transforms: optional joint transform (see :mod:`maskrcnn.data.transforms`).
        return_index: items become ``(image, target, index)``.
    """

    def __init__(self, dataset: Dataset, transforms: Optional[Callable] = None, return_index: bool = False):
        self.dataset = dataset
        self.transforms = transforms
        self.return_index = bool(return_index)

    def __len__(self) -> int:
        return len(self.dataset)

    def _describe(self, index: int) -> str:
        try:
            info = self.dataset.get_image_info(index)
            return f"image file {info.get('file_name')!r}, image id {info.get('id')}"
        except Exception as e:  # the description must not hide the real error
            return f"image file unknown ({type(e).__name__} in get_image_info: {e})"

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            image, target = self.dataset[index]
            if self.transforms is not None:
                generator = None if seed is None else torch.Generator().manual_seed(int(seed))
                image, target = self.transforms(image, target, generator=generator)
        except Exception as e:
            raise DatasetItemError(f"failed to load dataset index {index} ({self._describe(index)}) of "
                                   f"{self.dataset!r}: {type(e).__name__}: {e}") from e
        if self.return_index:
            return image, target, index
        return image, target


class LoaderIterator:
    """Iterator over a ``DataLoader`` that shuts its workers down as soon as an exception passes through.

    Why: the exception a loader re-raises holds, through its traceback, a reference cycle that includes the loader's
    iterator. Left to the cyclic garbage collector, the worker queues can be finalised before the iterator, so each
    worker then waits out a 5 s join timeout; here they are stopped at once. :meth:`close` stops them explicitly.
    """

    def __init__(self, iterator):
        self._it = iterator

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._it)

    def close(self) -> None:
        """Stop the worker processes (no-op without workers or when already stopped)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _TestDataLoader(DataLoader):
    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(super().__iter__())


def _as_dataset(datasets: Union[Dataset, Sequence[Dataset]]) -> Dataset:
    if isinstance(datasets, (list, tuple)):
        if not datasets:
            raise ValueError("build_train_loader: datasets is an empty list")
        return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    return datasets


def build_train_loader(datasets: Union[Dataset, Sequence[Dataset]], ims_per_batch: int, num_workers: int = 0,
                       aspect_grouping: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                       start_iter: int = 0, flip: bool = True, transforms: Optional[Callable] = None,
                       pin_memory: bool = False) -> "LoaderIterator":
    """Endless iterator of training batches ``(images, targets)`` for this rank.

    Args:
        datasets: a dataset or a list of datasets (concatenated; their ``classes`` must agree).
        ims_per_batch: images per batch on this rank.
        num_workers: loader worker processes (0: load in this process).
        aspect_grouping: batch landscape and portrait images separately (from ``get_image_info``, no pixels read).
        seed: seed of the index order and of the per-sample augmentation.
        rank, world_size: this process's shard (see :mod:`maskrcnn.data.samplers` for the interleaving).
        start_iter: first iteration (resume); the stream continues exactly where iteration ``start_iter - 1`` ended.
        flip: random horizontal flip with probability 0.5.
        transforms: extra transforms applied after the flip, e.g. ``ResizeShortestEdge`` (optional: the model
            resizes anyway).
        pin_memory: pin batches in page-locked memory (for CUDA training).

    Returns:
        a :class:`LoaderIterator` yielding ``(list of (3, H, W) float images, list of target dicts)``; it never
        ends (``close()`` stops its workers).
    """
    dataset = _as_dataset(datasets)
    if len(dataset) == 0:
        raise ValueError(f"build_train_loader: dataset {dataset!r} is empty")
    if int(ims_per_batch) < 1:
        raise ValueError(f"build_train_loader: ims_per_batch must be >= 1, got {ims_per_batch!r}")
    if int(num_workers) < 0:
        raise ValueError(f"build_train_loader: num_workers must be >= 0, got {num_workers!r}")
    group_ids = aspect_ratio_group_ids(dataset) if aspect_grouping else None
    batch_sampler = TrainingBatchSampler(len(dataset), int(ims_per_batch), group_ids=group_ids, seed=seed, rank=rank,
                                         world_size=world_size, start_iter=start_iter)
    steps = ([RandomHorizontalFlip(0.5)] if flip else []) + ([transforms] if transforms is not None else [])
    wrapped = LoaderDataset(dataset, Compose(steps) if steps else None)
    loader = DataLoader(
        wrapped, batch_sampler=batch_sampler, num_workers=int(num_workers), collate_fn=collate_fn,
        # No worker_init_fn touching OpenCV: cv2.setNumThreads in a forked worker can deadlock on the thread pool
        # state inherited from the parent, while plain cv2 calls there are safe.
        pin_memory=pin_memory,
        # The loader's base seed comes from this generator, not from the global RNG (which it would advance).
        generator=torch.Generator().manual_seed(int(seed)),
    )
    return LoaderIterator(iter(loader))


def build_test_loader(dataset: Dataset, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                      ims_per_batch: int = 1, transforms: Optional[Callable] = None) -> DataLoader:
    """One in-order pass over this rank's contiguous shard, yielding ``(images, targets, indices)``.

    Returns a ``DataLoader`` (``len()`` is the number of batches of this shard) whose iterators are
    :class:`LoaderIterator` objects.

    Shard ``rank`` holds indices ``[rank * n // world_size, (rank + 1) * n // world_size)``; concatenating the
    shards' outputs in rank order restores the dataset order. ``indices`` are dataset indices (ints).
    ``transforms`` (deterministic ones, e.g. a single-size ``ResizeShortestEdge``) are optional.
    """
    if int(ims_per_batch) < 1:
        raise ValueError(f"build_test_loader: ims_per_batch must be >= 1, got {ims_per_batch!r}")
    if int(num_workers) < 0:
        raise ValueError(f"build_test_loader: num_workers must be >= 0, got {num_workers!r}")
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return _TestDataLoader(
        LoaderDataset(dataset, transforms, return_index=True),
        batch_sampler=BatchSampler(sampler, int(ims_per_batch), drop_last=False),
        num_workers=int(num_workers), collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
