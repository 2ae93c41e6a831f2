"""Data loaders: an endless, sharded, resumable training stream and an in-order sharded test pass.

Both wrap the dataset so that an exception raised while loading item ``i`` (in the main process or in a worker)
reaches the caller as a :class:`DatasetItemError` naming the dataset index and the image file, with the original
exception's type, message and (from workers) traceback in its text. A worker process that dies without an exception
(killed, out of memory, a segfault in a decoder) surfaces as :class:`WorkerDiedError` naming the item it was loading:
each worker records, in a small shared-memory table, its pid and the index it is loading.

Before training, :func:`build_train_loader` validates the dataset (:mod:`maskrcnn.data.validate`): images that cannot
be read fail before the first step, or are skipped with ``skip_unreadable=True``.

Training randomness (horizontal flips, a random resize size) is drawn from a ``torch.Generator`` seeded per sample by
:class:`~maskrcnn.data.samplers.TrainingBatchSampler`, never from worker or global RNG state, so a run is reproducible
for a given ``seed`` whatever ``num_workers`` is, and resuming at ``start_iter`` replays exactly the batches and
flips the uninterrupted run would have produced.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, get_worker_info

from .cache import CachedDataset
from .catalog import ConcatDataset
from .collate import collate_fn
from .samplers import InferenceSampler, TrainingBatchSampler, aspect_ratio_group_ids
from .transforms import Compose, RandomHorizontalFlip
from .validate import check_and_filter

__all__ = ["DatasetItemError", "WorkerDiedError", "LoaderDataset", "LoaderIterator", "build_train_loader",
           "build_test_loader"]


class DatasetItemError(RuntimeError):
    """Loading one dataset item failed; the message names the index, the image file and the original error."""


class WorkerDiedError(RuntimeError):
    """A loader worker process died without raising (killed by a signal, out of memory, a crash in native code)."""


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
        self._progress: Optional[torch.Tensor] = None

    def track_workers(self, num_workers: int) -> None:
        """Allocate the shared ``(num_workers, 2)`` table of ``(pid, index being loaded)`` the workers fill in."""
        self._progress = torch.full((max(int(num_workers), 1), 2), -1, dtype=torch.int64).share_memory_()

    def in_flight(self) -> List[Tuple[int, int, int]]:
        """``(worker id, pid, index)`` of each worker that is inside ``__getitem__`` now (or died there)."""
        if self._progress is None:
            return []
        return [(w, int(pid), int(idx)) for w, (pid, idx) in enumerate(self._progress.tolist()) if idx >= 0]

    def describe(self, index: int) -> str:
        return self._describe(index)

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
        info = get_worker_info() if self._progress is not None else None
        if info is not None:
            self._progress[info.id, 0] = os.getpid()
            self._progress[info.id, 1] = int(index)
        try:
            image, target = self.dataset[index]
            if self.transforms is not None:
                generator = None if seed is None else torch.Generator().manual_seed(int(seed))
                image, target = self.transforms(image, target, generator=generator)
        except Exception as e:
            raise DatasetItemError(f"failed to load dataset index {index} ({self._describe(index)}) of "
                                   f"{self.dataset!r}: {type(e).__name__}: {e}") from e
        if info is not None:
            self._progress[info.id, 1] = -1
        if self.return_index:
            return image, target, index
        return image, target


class LoaderIterator:
    """Iterator over a ``DataLoader`` that shuts its workers down as soon as an exception passes through.

    Why: the exception a loader re-raises holds, through its traceback, a reference cycle that includes the loader's
    iterator. Left to the cyclic garbage collector, the worker queues can be finalised before the iterator, so each
    worker then waits out a 5 s join timeout; here they are stopped at once. :meth:`close` stops them explicitly.
    """

    def __init__(self, iterator, dataset: Optional[LoaderDataset] = None):
        self._it = iterator
        self._dataset = dataset

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise
        except DatasetItemError:
            self.close()
            raise
        except Exception as e:
            if self._dataset is None or not isinstance(e, (ConnectionError, EOFError, RuntimeError)):
                self.close()
                raise
            text = f"{type(e).__name__}: {e}"
            dead = {}
            # The batch a dying worker shared can fail to arrive before the process is reaped, so wait briefly;
            # meanwhile the loader's SIGCHLD handler may raise its own "worker killed" RuntimeError here.
            for _ in range(3):
                try:
                    dead = self._dead_workers(wait=0.5)
                    break
                except RuntimeError as again:
                    text += f"; {again}"
            if dead or (type(e) is RuntimeError and "DataLoader worker" in str(e)):
                message = self._explain_dead_worker(text, dead)
                self._close_quietly()
                raise WorkerDiedError(message) from e
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def _close_quietly(self) -> None:
        for _ in range(3):
            try:
                self.close()
                return
            except RuntimeError:  # the SIGCHLD handler again; the original error is what matters
                continue

    def _dead_workers(self, wait: float = 0.0) -> dict:
        """``{pid: exitcode}`` of worker processes that have exited (a killed worker can surface in the main process
        as a RuntimeError, or as a ConnectionResetError/EOFError while receiving a batch it shared)."""
        out = {}
        workers = getattr(self._it, "_workers", None) or []
        if wait > 0:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and all(w.exitcode in (None, 0) for w in workers):
                time.sleep(0.02)
        for w in workers:
            code = getattr(w, "exitcode", None)
            if code is not None and code != 0:
                out[w.pid] = code
        return out

    def _explain_dead_worker(self, text: str, dead: dict) -> str:
        m = re.search(r"pid(?:\(s\))?\s+([\d,\s]+)", text)
        pids = ({int(p) for p in re.findall(r"\d+", m.group(1))} if m else set()) | set(dead)
        if dead:
            text += "; " + ", ".join(f"pid {pid} exit code {code}" + (f" (signal {-code})" if code < 0 else "")
                                     for pid, code in dead.items())
        flight = self._dataset.in_flight()
        named = [f for f in flight if f[1] in pids] or flight
        if not named:
            what = "it was not loading an item (it died between items)"
        else:
            what = "; ".join(f"worker {w} (pid {pid}) was loading dataset index {idx} ({self._dataset.describe(idx)})"
                             for w, pid, idx in named)
        return (f"a data loader worker process died without raising an exception ({text.strip()}); {what}. "
                f"Common causes: the out-of-memory killer (check dmesg; lower DATA_LOADER.NUM_THREADS or image "
                f"sizes), a crash in an image decoder on that file, or an external kill.")

    def __len__(self) -> int:
        return len(self._it)

    def close(self) -> None:
        """Stop the worker processes (no-op without workers or when already stopped)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _TestDataLoader(DataLoader):
    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(super().__iter__(), self.dataset)


def _as_dataset(datasets: Union[Dataset, Sequence[Dataset]]) -> Dataset:
    if isinstance(datasets, (list, tuple)):
        if not datasets:
            raise ValueError("build_train_loader: datasets is an empty list")
        return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    return datasets


def build_train_loader(datasets: Union[Dataset, Sequence[Dataset]], ims_per_batch: int, num_workers: int = 0,
                       aspect_grouping: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                       aspect_group_factor: int = 0,
                       start_iter: int = 0, flip: bool = True, transforms: Optional[Callable] = None,
                       pin_memory: bool = False, validate: bool = True,
                       skip_unreadable: bool = False, cache_mb: float = 0) -> "LoaderIterator":
    """Endless iterator of training batches ``(images, targets)`` for this rank.

    Args:
        datasets: a dataset or a list of datasets (concatenated; their ``classes`` must agree).
        ims_per_batch: images per batch on this rank.
        num_workers: loader worker processes (0: load in this process).
        aspect_grouping: batch landscape and portrait images separately (from ``get_image_info``, no pixels read).
        aspect_group_factor: with ``aspect_grouping``, 0 for landscape/portrait groups, ``k >= 1`` for
            torchvision's ``2k + 2`` aspect-ratio bins (less padding when aspects vary); cfg
            ``TRAIN.ASPECT_RATIO_GROUP_FACTOR``.
        seed: seed of the index order and of the per-sample augmentation.
        rank, world_size: this process's shard (see :mod:`maskrcnn.data.samplers` for the interleaving).
        start_iter: first iteration (resume); the stream continues exactly where iteration ``start_iter - 1`` ended.
        flip: random horizontal flip with probability 0.5.
        transforms: extra transforms applied after the flip, e.g. ``ResizeShortestEdge`` (optional: the model
            resizes anyway).
        pin_memory: pin batches in page-locked memory (for CUDA training).
        validate: check the dataset first (:func:`maskrcnn.data.validate.validate_dataset`: file existence,
            header, truncation, recorded size; no decoding) so that unreadable images fail before training starts.
        skip_unreadable: instead of failing, leave unreadable images out (with one warning listing them); cfg
            ``DATA_LOADER.SKIP_UNREADABLE``.
        cache_mb: keep decoded items in memory up to this many MiB per loading process
            (:class:`~maskrcnn.data.cache.CachedDataset`; 0 off); cfg ``DATA_LOADER.CACHE_RAM_MB``.

    Raises:
        maskrcnn.data.validate.UnreadableImagesError: ``validate`` found unusable images and ``skip_unreadable``
            is False (the message counts them per kind and names the first files and image ids).

    Returns:
        a :class:`LoaderIterator` yielding ``(list of (3, H, W) float images, list of target dicts)``; it never
        ends (``close()`` stops its workers).
    """
    dataset = _as_dataset(datasets)
    if validate and len(dataset) > 0:
        dataset = check_and_filter(dataset, skip_unreadable=skip_unreadable)
    if len(dataset) == 0:
        raise ValueError(f"build_train_loader: dataset {dataset!r} is empty")
    if float(cache_mb) > 0:
        dataset = CachedDataset(dataset, cache_mb)
    if int(ims_per_batch) < 1:
        raise ValueError(f"build_train_loader: ims_per_batch must be >= 1, got {ims_per_batch!r}")
    if int(num_workers) < 0:
        raise ValueError(f"build_train_loader: num_workers must be >= 0, got {num_workers!r}")
    group_ids = aspect_ratio_group_ids(dataset, int(aspect_group_factor)) if aspect_grouping else None
    batch_sampler = TrainingBatchSampler(len(dataset), int(ims_per_batch), group_ids=group_ids, seed=seed, rank=rank,
                                         world_size=world_size, start_iter=start_iter)
    # A keypoint dataset says which keypoints swap under the flip (COCODataset.keypoint_flip_indices).
    steps = ([RandomHorizontalFlip(0.5, getattr(dataset, "keypoint_flip_indices", None))] if flip else []) + ([transforms] if transforms is not None else [])
    wrapped = LoaderDataset(dataset, Compose(steps) if steps else None)
    if int(num_workers) > 0:
        wrapped.track_workers(int(num_workers))
    loader = DataLoader(
        wrapped, batch_sampler=batch_sampler, num_workers=int(num_workers), collate_fn=collate_fn,
        # No worker_init_fn touching OpenCV: cv2.setNumThreads in a forked worker can deadlock on the thread pool
        # state inherited from the parent, while plain cv2 calls there are safe.
        pin_memory=pin_memory, worker_init_fn=_worker_outlives_stop_signals,
        # The loader's base seed comes from this generator, not from the global RNG (which it would advance).
        generator=torch.Generator().manual_seed(int(seed)),
    )
    return LoaderIterator(iter(loader), wrapped)


def _worker_outlives_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Training loader workers ignore SIGTERM and SIGUSR1.

    Why: a scheduler signals every process of the job, and torch's worker handler dies on a SIGTERM that does not
    come from its parent; the main process turns these signals into a checkpoint at the next iteration
    (:mod:`maskrcnn.engine.preemption`) and needs its workers until then. They still exit with their parent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
    wrapped = LoaderDataset(dataset, transforms, return_index=True)
    if int(num_workers) > 0:
        wrapped.track_workers(int(num_workers))
    return _TestDataLoader(
        wrapped,
        batch_sampler=BatchSampler(sampler, int(ims_per_batch), drop_last=False),
        num_workers=int(num_workers), collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
