"""Keep a small training set's decoded items in memory (``DATA_LOADER.CACHE_RAM_MB``).

A training run over a few hundred images decodes each image many times (every epoch), and on a CPU that decoding
(JPEG/PNG, or the synthetic generator) competes with the training step for the same cores: about 15% of a step on
the 2-core machine for 128-384 px images. :class:`CachedDataset` keeps each item the first time it is read, before
any augmentation (the loader flips afterwards), up to a memory limit; later reads return a copy.

Images whose pixels are exactly ``k / 255`` (every image decoded from an 8-bit file) are stored as uint8 and
turned back into the identical float tensor; others (the synthetic sets' noisy pixels) are stored as given. The
cache lives in the process that reads the items: with ``DATA_LOADER.NUM_THREADS`` workers, each worker fills its
own copy (memory times the workers), so it is meant for ``NUM_THREADS 0``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CachedDataset"]


def _copy_target(target: Any) -> Any:
    # Transforms may write into the target dict or its tensors; the cached ones must stay as read.
    if isinstance(target, dict):
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in target.items()}
    return target


def _nbytes(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


class CachedDataset(Dataset):
    """``dataset`` with its items kept in memory after the first read, up to ``max_mb`` MiB.

    Args:
        dataset: items ``(image (3, H, W) float in [0, 1], target dict)``; attributes (``classes``,
            ``get_image_info``, ...) are passed through.
        max_mb: memory limit of the kept items in MiB (images stored as uint8 when exact); items read once the
            limit is reached are not kept.

    ``__getitem__`` returns tensors equal to ``dataset[index]``, as new tensors each time.
    """

    def __init__(self, dataset: Dataset, max_mb: float):
        if float(max_mb) <= 0:
            raise ValueError(f"CachedDataset: max_mb must be > 0, got {max_mb!r}")
        self.dataset = dataset
        self.max_bytes = int(float(max_mb) * 2 ** 20)
        self.nbytes = 0
        self._items: Dict[int, Tuple[Tensor, bool, Any]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # Only called for attributes not found on the wrapper: the dataset's own (classes, get_image_info, ...).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        kept = self._items.get(int(index))
        if kept is not None:
            pixels, as_uint8, target = kept
            image = pixels.float().div_(255) if as_uint8 else pixels.clone()
            return image, _copy_target(target)
        image, target = self.dataset[index]
        self._keep(int(index), image, target)
        return image, target

    def _keep(self, index: int, image: Tensor, target: Any) -> None:
        pixels, as_uint8 = image, False
        if image.dtype == torch.float32:
            u8 = image.mul(255).round_().clamp_(0, 255).to(torch.uint8)
            if torch.equal(u8.float().div_(255), image):
                pixels, as_uint8 = u8, True
        stored = (pixels if as_uint8 else image.clone(), as_uint8, _copy_target(target))
        size = _nbytes(stored[0]) + _nbytes(stored[2])
        if self.nbytes + size > self.max_bytes:
            return
        self._items[index] = stored
        self.nbytes += size

    def __repr__(self) -> str:
        return (f"CachedDataset({self.dataset!r}, {len(self._items)} items kept, {self.nbytes / 2 ** 20:.1f} of "
                f"{self.max_bytes / 2 ** 20:.0f} MiB)")

    def kept(self) -> int:
        """Number of items in memory."""
        return len(self._items)
