"""Load-time validation of a dataset: every problem found, reported together, before any training step.

Policy (documented in ``docs/reliability.md``):

* **Bad instances** (box with NaN/inf, zero or negative width/height, lying outside the image; polygon with fewer
  than 3 points; RLE whose size disagrees with the image; undeclared category; annotation of an image id that is
  not in the json) are dropped when the dataset is built, with *one* warning that counts them per kind and quotes
  the first examples (annotation id, image id, file). Boxes partly outside the image are clipped and counted too.
* **Images that cannot be read** (missing, empty, truncated, not an image, size not the one the json records,
  instance-mask file of another shape) make :func:`validate_dataset` report them all; the loader builder then
  fails before training starts (:class:`UnreadableImagesError`), or with ``skip_unreadable=True``
  (``DATA_LOADER.SKIP_UNREADABLE``) drops them with a warning.
* An image with no objects is kept (a negative image) unless the dataset's own filter removes it.

The image checks are cheap: file size, the JPEG end marker / PNG ``IEND`` chunk, and the header (size, EXIF
orientation) read by PIL; no pixels are decoded unless ``decode=True``.

Datasets opt in by duck typing: ``image_files(index) -> list of (path, expected (h, w) or None)`` lists the files an
item reads (:class:`~maskrcnn.data.datasets.coco.COCODataset` and
:class:`~maskrcnn.data.datasets.pennfudan.PennFudanDataset` have it; a dataset without it, e.g. the synthetic one,
has no files to check) and ``annotation_problems`` holds the instances dropped at construction.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import cv2
from torch.utils.data import Dataset

from .transforms import image_file_size

__all__ = ["DataProblem", "ValidationReport", "UnreadableImagesError", "validate_dataset", "summarize_problems",
           "SkipIndices", "check_and_filter"]

#: Problem kinds that make an image unusable (the others drop one instance).
IMAGE_KINDS = ("missing_file", "unreadable_image", "image_size_mismatch", "mask_shape_mismatch")


@dataclasses.dataclass
class DataProblem:
    """One problem: ``kind`` (e.g. ``"nonfinite_box"``), a message, and whatever identifies the sample."""

    kind: str
    message: str
    image_id: Any = None
    ann_id: Any = None
    file: Optional[str] = None
    index: Optional[int] = None

    def describe(self) -> str:
        where = [f"{k} {v}" for k, v in (("image id", self.image_id), ("annotation id", self.ann_id),
                                          ("file", self.file), ("dataset index", self.index)) if v is not None]
        return f"{self.message}" + (f" [{', '.join(where)}]" if where else "")


def summarize_problems(problems: Sequence[DataProblem], max_examples: int = 3, header: str = "") -> str:
    """Multi-line text: ``header``, then per kind its count and the first ``max_examples`` examples."""
    by_kind: "OrderedDict[str, List[DataProblem]]" = OrderedDict()
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    lines = [header] if header else []
    for kind, items in by_kind.items():
        lines.append(f"  {kind}: {len(items)}")
        for p in items[:max_examples]:
            lines.append(f"    - {p.describe()}")
        if len(items) > max_examples:
            lines.append(f"    ... and {len(items) - max_examples} more")
    return "\n".join(lines)


class UnreadableImagesError(RuntimeError):
    """Some images of the dataset cannot be read; the message lists them (count per kind, first examples)."""


@dataclasses.dataclass
class ValidationReport:
    """Everything :func:`validate_dataset` found.

    Attributes:
        dataset: ``repr`` of the dataset.
        num_images: number of items checked.
        problems: all problems, instance-level (already dropped by the dataset) and image-level.
        unreadable: sorted dataset indices whose image (or mask) cannot be used.
    """

    dataset: str
    num_images: int
    problems: List[DataProblem]
    unreadable: List[int]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def image_problems(self) -> List[DataProblem]:
        return [p for p in self.problems if p.kind in IMAGE_KINDS]

    def instance_problems(self) -> List[DataProblem]:
        return [p for p in self.problems if p.kind not in IMAGE_KINDS]

    def summary(self, max_examples: int = 3) -> str:
        if self.ok:
            return f"{self.dataset}: {self.num_images} images, no problems"
        n_inst = len(self.instance_problems())
        head = (f"{self.dataset}: {self.num_images} images checked; {len(self.unreadable)} unusable image(s), "
                f"{n_inst} annotation problem(s) (bad instances were dropped, partial boxes clipped)")
        return summarize_problems(self.problems, max_examples, head)

    def raise_if_unreadable(self, max_examples: int = 5) -> None:
        """Raise :class:`UnreadableImagesError` listing the unusable images, if any."""
        if self.unreadable:
            bad = self.image_problems()
            raise UnreadableImagesError(summarize_problems(
                bad, max_examples, f"{len(self.unreadable)} image(s) of {self.dataset} cannot be used; fix or "
                                   f"remove them, or set DATA_LOADER.SKIP_UNREADABLE True to skip them:"))


def _parts(dataset: Dataset):
    """``(part, offset)`` pairs of a (possibly nested) concatenation, else the dataset itself at offset 0."""
    inner = getattr(dataset, "datasets", None)
    if isinstance(inner, (list, tuple)) and hasattr(dataset, "cumulative_sizes"):
        offset = 0
        for d, end in zip(inner, dataset.cumulative_sizes):
            for part, off in _parts(d):
                yield part, offset + off
            offset = end
    else:
        yield dataset, 0


def _check_files(dataset: Dataset, index: int, decode: bool) -> Optional[DataProblem]:
    info: Dict[str, Any] = {}
    try:
        info = dataset.get_image_info(index)
    except Exception:  # the file checks below name what is wrong
        pass
    image_id = info.get("id")
    try:
        files = dataset.image_files(index)
    except FileNotFoundError as e:
        return DataProblem("missing_file", str(e), image_id=image_id, file=info.get("file_name"), index=index)
    first_size = None
    for k, (path, expected) in enumerate(files):
        try:
            size = image_file_size(path, image_id)
        except FileNotFoundError as e:
            return DataProblem("missing_file", str(e), image_id=image_id, file=path, index=index)
        except OSError as e:
            return DataProblem("unreadable_image", str(e), image_id=image_id, file=path, index=index)
        if expected is not None and tuple(expected) != tuple(size):
            hint = " (EXIF orientation rotates it; record the displayed size)" if tuple(expected) == size[::-1] else ""
            return DataProblem("image_size_mismatch", f"file is {size[0]}x{size[1]} (HxW) but the annotations say "
                               f"{expected[0]}x{expected[1]}{hint}", image_id=image_id, file=path, index=index)
        if k == 0:
            first_size = size
        elif size != first_size:
            return DataProblem("mask_shape_mismatch", f"mask file is {size[0]}x{size[1]} but the image is "
                               f"{first_size[0]}x{first_size[1]}", image_id=image_id, file=path, index=index)
        if decode and k == 0 and cv2.imread(path, cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
            return DataProblem("unreadable_image", "OpenCV cannot decode the file", image_id=image_id, file=path,
                               index=index)
    return None


def validate_dataset(dataset: Dataset, decode: bool = False) -> ValidationReport:
    """Check every item's files and collect the dataset's annotation problems into one report.

    Args:
        dataset: a dataset, or a concatenation of datasets (indices in the report are of the whole).
        decode: also decode each image at 1/8 scale with OpenCV (slower; the default checks are header-only).

    Returns:
        a :class:`ValidationReport`; nothing is raised here (see :meth:`ValidationReport.raise_if_unreadable`).
    """
    problems: List[DataProblem] = []
    unreadable: List[int] = []
    for part, offset in _parts(dataset):
        for p in getattr(part, "annotation_problems", []) or []:
            problems.append(p)
        if not hasattr(part, "image_files"):
            continue
        for i in range(len(part)):
            p = _check_files(part, i, decode)
            if p is not None:
                p.index = offset + i
                problems.append(p)
                unreadable.append(offset + i)
    return ValidationReport(dataset=repr(dataset), num_images=len(dataset), problems=problems,
                            unreadable=sorted(unreadable))


class SkipIndices(Dataset):
    """``dataset`` without the items ``skip``; keeps ``classes``, label maps and ``get_image_info``."""

    def __init__(self, dataset: Dataset, skip: Sequence[int]):
        drop = set(int(i) for i in skip)
        self.dataset = dataset
        self.indices = [i for i in range(len(dataset)) if i not in drop]
        if not self.indices:
            raise ValueError(f"SkipIndices: every image of {dataset!r} was skipped")
        for attr in ("classes", "contiguous_to_category_id", "category_id_to_contiguous"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def get_image_info(self, index: int) -> Dict[str, Any]:
        return self.dataset.get_image_info(self.indices[index])

    def __repr__(self) -> str:
        return f"SkipIndices({self.dataset!r}, skipped={len(self.dataset) - len(self.indices)})"


def check_and_filter(dataset: Dataset, skip_unreadable: bool = False, decode: bool = False) -> Dataset:
    """Validate ``dataset`` before training: warn the summary, then fail on unusable images or skip them."""
    report = validate_dataset(dataset, decode=decode)
    if report.unreadable and not skip_unreadable:
        report.raise_if_unreadable()
    if report.image_problems():
        warnings.warn("skipping unusable images (DATA_LOADER.SKIP_UNREADABLE):\n" + report.summary(), stacklevel=2)
        return SkipIndices(dataset, report.unreadable)
    return dataset
