"""Batch collation for detection data: images differ in size, so a batch stays a list (the model pads it)."""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

__all__ = ["collate_fn"]


def collate_fn(batch: Sequence[Tuple[Any, ...]]) -> Tuple[List[Any], ...]:
    """Transpose a list of dataset items into per-field lists.

    ``[(image, target), ...] -> (list of (3, H_i, W_i) images, list of target dicts)``; items with more fields
    (the test loader's ``(image, target, index)``) give one list per field. Nothing is stacked or copied.
    """
    if len(batch) == 0:
        raise ValueError("collate_fn: got an empty batch")
    width = len(batch[0])
    for i, item in enumerate(batch):
        if len(item) != width:
            raise ValueError(f"collate_fn: batch item {i} has {len(item)} fields, item 0 has {width}")
    return tuple(list(field) for field in zip(*batch))
