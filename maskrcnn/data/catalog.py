"""Dataset names and specs: what ``TRAIN.DATASETS`` / ``TEST.DATASETS`` and ``--dataset`` accept.

A spec is one of

* ``coco:ANN_JSON[:IMAGE_DIR]`` — any COCO-format json (``IMAGE_DIR`` defaults to the json's folder);
* ``pennfudan:ROOT[:train|test|all]`` — the Penn-Fudan layout (split defaults to ``train`` when training,
  ``test`` otherwise);
* ``synthetic:train|val`` (or ``synthetic``: train when training, val otherwise) — the built-in shapes set;
* ``synthetic:keypoints[:train|val]`` — the built-in set with the extreme points of each shape as keypoints
  (registered as ``synthetic_keypoints_train`` / ``synthetic_keypoints_val``);
* ``synthetic:VARIANT[:train|val]`` — a variant of the synthetic family
  (:mod:`maskrcnn.data.datasets.synthetic_family`: ``basic``, ``tiny``, ``large``, ``thin``, ``crowd``, ``span``,
  ``ten``, ``mixed``, ``wide``); also registered as catalog names ``synthetic_VARIANT_train`` / ``synthetic_VARIANT_val``;
* a catalog name: the built-in COCO splits (``coco_2017_train``, ``coco_2017_val``, ``coco_2014_train``,
  ``coco_2014_val``, ``coco_2014_minival``, ``coco_2014_valminusminival``) found under ``DATA_DIR`` as
  ``DATA_DIR/coco/annotations/instances_<split>.json`` and ``DATA_DIR/coco/<image folder>``, or a registered name;
* several of the above joined by commas (or given as a list): their concatenation, which requires equal ``classes``
  (a comma not followed by a kind or a catalog name is part of a path: ``coco:/data/my set, v2/ann.json``).

Paths in specs are used as given (relative ones are relative to the working directory). Every error raised while
building a spec is a :class:`DatasetSpecError` whose message quotes the spec.

Registering a dataset from Python::

    from maskrcnn.data.catalog import DatasetCatalog
    from maskrcnn.data.datasets.coco import COCODataset

    DatasetCatalog.register("my_train", lambda: COCODataset("/data/my/train.json", "/data/my/images"))
    cfg.TRAIN.DATASETS = ["my_train"]          # or: tools/train_net.py --dataset my_train

The factory takes no arguments and is called each time the name is built; it must return a dataset following the
item contract of ``maskrcnn/data/datasets`` (``(image, target)`` items, ``classes``, ``get_image_info(i)``).
"""
from __future__ import annotations

import bisect
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch.utils.data import ConcatDataset as _TorchConcatDataset
from torch.utils.data import Dataset

from ..config import ConfigError
from .datasets.coco import COCODataset
from .datasets.pennfudan import PennFudanDataset
from .datasets.synthetic import SyntheticShapesDataset
from .datasets.synthetic_family import VARIANTS as SYNTHETIC_VARIANTS
from .datasets.synthetic_family import SyntheticFamilyDataset

__all__ = ["DatasetCatalog", "DatasetSpecError", "ConcatDataset", "build_dataset", "check_class_order",
           "check_num_classes", "split_specs", "COCO_SPLITS"]

#: Built-in COCO splits: name -> (image folder, annotation json), both relative to DATA_DIR.
COCO_SPLITS: Dict[str, Tuple[str, str]] = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_val": ("coco/val2014", "coco/annotations/instances_val2014.json"),
    "coco_2014_minival": ("coco/val2014", "coco/annotations/instances_minival2014.json"),
    "coco_2014_valminusminival": ("coco/val2014", "coco/annotations/instances_valminusminival2014.json"),
}
_SPEC_KINDS = ("coco", "pennfudan", "synthetic")


class DatasetSpecError(ValueError):
    """A dataset spec or catalog name could not be turned into a dataset (the message names the spec)."""


class ConcatDataset(_TorchConcatDataset):
    """Concatenation of datasets with identical ``classes``; keeps ``classes`` and ``get_image_info``.

    ``image_id`` values come from the parts unchanged, so they need not be unique across parts.
    """

    def __init__(self, datasets: Sequence[Dataset]):
        datasets = list(datasets)
        if not datasets:
            raise ValueError("ConcatDataset: needs at least one dataset")
        first = list(getattr(datasets[0], "classes", []) or [])
        for d in datasets[1:]:
            other = list(getattr(d, "classes", []) or [])
            if other != first:
                raise ValueError(f"ConcatDataset: datasets have different classes: {datasets[0]!r} has {first}, "
                                 f"{d!r} has {other}")
        super().__init__(datasets)
        self.classes: List[str] = first
        # COCODataset's counts, summed; None when a part does not count its objects.
        counted = all(getattr(d, "num_objects", None) is not None for d in datasets)
        self.num_objects = sum(int(d.num_objects) for d in datasets) if counted else None
        self.box_masked = sum(int(getattr(d, "box_masked", 0) or 0) for d in datasets) if counted else None
        maps = [getattr(d, "contiguous_to_category_id", None) for d in datasets]
        if maps[0] is not None and all(m == maps[0] for m in maps):
            self.contiguous_to_category_id = dict(maps[0])
            self.category_id_to_contiguous = {v: k for k, v in maps[0].items()}

    def locate(self, index: int) -> Tuple[int, int]:
        """``(part, index within part)`` of item ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"ConcatDataset: index {index} out of range for {len(self)} items")
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return part, index - (self.cumulative_sizes[part - 1] if part > 0 else 0)

    def get_image_info(self, index: int) -> Dict[str, Any]:
        part, local = self.locate(index)
        return self.datasets[part].get_image_info(local)

    def __repr__(self) -> str:
        return f"ConcatDataset({', '.join(repr(d) for d in self.datasets)})"


class DatasetCatalog:
    """Global registry of dataset names -> zero-argument factories (plus the built-in COCO splits)."""

    _factories: Dict[str, Callable[[], Dataset]] = {}

    @classmethod
    def register(cls, name: str, factory: Callable[[], Dataset]) -> None:
        """Register ``factory`` under ``name``; names must be new and contain neither ``:`` nor ``,``."""
        if not isinstance(name, str) or not name or any(c in name for c in ":,") or name != name.strip():
            raise ValueError(f"DatasetCatalog.register: invalid name {name!r} (non-empty, no ':' ',' or spaces "
                             f"around it)")
        if not callable(factory):
            raise TypeError(f"DatasetCatalog.register: factory for {name!r} is not callable: {factory!r}")
        if name in cls._factories or name in COCO_SPLITS or name in _SPEC_KINDS:
            raise ValueError(f"DatasetCatalog.register: name {name!r} is already taken")
        cls._factories[name] = factory

    @classmethod
    def remove(cls, name: str) -> None:
        """Forget a registered name (built-ins cannot be removed)."""
        if name not in cls._factories:
            raise KeyError(f"DatasetCatalog.remove: {name!r} is not a registered dataset")
        del cls._factories[name]

    @classmethod
    def list(cls) -> List[str]:
        """All catalog names: built-in COCO splits and registered names, sorted."""
        return sorted(set(COCO_SPLITS) | set(cls._factories))

    @classmethod
    def get(cls, name: str, data_dir: str = "datasets", remove_images_without_annotations: bool = False,
            max_image_side: Optional[int] = None, box_masks: bool = False) -> Dataset:
        """Build dataset ``name``; ``data_dir`` (cfg ``DATA_DIR``) locates the built-in COCO splits.

        ``remove_images_without_annotations``, ``max_image_side`` and ``box_masks`` (see :class:`COCODataset`)
        apply to the built-in COCO splits only.
        """
        if name in cls._factories:
            dataset = cls._factories[name]()
            if dataset is None or not hasattr(dataset, "__getitem__"):
                raise DatasetSpecError(f"factory of dataset {name!r} returned {dataset!r}, not a dataset")
            return dataset
        if name in COCO_SPLITS:
            image_rel, ann_rel = COCO_SPLITS[name]
            ann, images = os.path.join(data_dir, ann_rel), os.path.join(data_dir, image_rel)
            for path in (ann, images):
                if not os.path.exists(path):
                    raise DatasetSpecError(f"dataset {name!r} expects {path} (DATA_DIR={data_dir!r}); put COCO there "
                                           f"or set DATA_DIR")
            return COCODataset(ann, images, remove_images_without_annotations=remove_images_without_annotations,
                               max_image_side=max_image_side, box_masks=box_masks)
        raise DatasetSpecError(f"unknown dataset {name!r}; catalog names: {cls.list()}; or a spec "
                               f"coco:ANN_JSON[:IMAGE_DIR], pennfudan:ROOT[:train|test|all], synthetic:train|val, "
                               f"synthetic:VARIANT[:train|val]")


def _build_one(spec: str, data_dir: str, is_train: bool, filter_empty: bool,
               max_image_side: Optional[int], box_masks: bool) -> Dataset:
    fields = spec.split(":")
    kind = fields[0]
    if len(fields) == 1:
        if kind == "synthetic":
            return SyntheticShapesDataset("train" if is_train else "val")
        return DatasetCatalog.get(kind, data_dir, remove_images_without_annotations=filter_empty and is_train,
                                  max_image_side=max_image_side, box_masks=box_masks)
    if kind == "coco":
        if len(fields) not in (2, 3) or not fields[1]:
            raise DatasetSpecError(f"dataset spec {spec!r}: expected coco:ANN_JSON[:IMAGE_DIR]")
        ann = fields[1]
        image_dir = fields[2] if len(fields) == 3 and fields[2] else os.path.dirname(ann) or "."
        return COCODataset(ann, image_dir, remove_images_without_annotations=filter_empty and is_train,
                           max_image_side=max_image_side, box_masks=box_masks)
    if kind == "pennfudan":
        if len(fields) not in (2, 3) or not fields[1]:
            raise DatasetSpecError(f"dataset spec {spec!r}: expected pennfudan:ROOT[:train|test|all]")
        split = fields[2] if len(fields) == 3 else ("train" if is_train else "test")
        return PennFudanDataset(fields[1], split=split)
    if kind == "synthetic":
        if len(fields) == 2 and fields[1] in ("train", "val"):
            return SyntheticShapesDataset(fields[1])
        if fields[1] == "keypoints" and (len(fields) == 2 or (len(fields) == 3 and fields[2] in ("train", "val"))):
            return SyntheticShapesDataset(fields[2] if len(fields) == 3 else ("train" if is_train else "val"),
                                          keypoints=True)
        if fields[1] in SYNTHETIC_VARIANTS and (len(fields) == 2 or (len(fields) == 3 and fields[2] in ("train",
                                                                                                         "val"))):
            split = fields[2] if len(fields) == 3 else ("train" if is_train else "val")
            return SyntheticFamilyDataset(fields[1], split)
        raise DatasetSpecError(f"dataset spec {spec!r}: expected synthetic:train or synthetic:val, "
                               f"synthetic:keypoints[:train|val], or synthetic:VARIANT[:train|val] with VARIANT one "
                               f"of {list(SYNTHETIC_VARIANTS)}")
    raise DatasetSpecError(f"dataset spec {spec!r}: unknown kind {kind!r}; expected one of {list(_SPEC_KINDS)} "
                           f"or a catalog name")


def split_specs(full: str) -> List[str]:
    """The specs of a comma-joined ``full``, stripped. A comma begins a new spec only where what follows starts
    one (a kind ``coco:``/``pennfudan:``/``synthetic`` or a catalog name); elsewhere it belongs to the path before
    it, so ``coco:/data/my set, v2/ann.json`` is one spec."""
    pieces = full.split(",")
    parts = [pieces[0]]
    for piece in pieces[1:]:
        head = piece.strip().split(":")[0]
        starts = head in _SPEC_KINDS or head in DatasetCatalog.list()
        previous = parts[-1].strip().split(":")[0]
        if not starts and previous in ("coco", "pennfudan") and piece.strip():
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return [p.strip() for p in parts]


def build_dataset(spec: Union[str, Sequence[str]], data_dir: str = "datasets", is_train: bool = True,
                  filter_empty: bool = False, max_image_side: Optional[int] = None,
                  box_masks: bool = False) -> Dataset:
    """Build the dataset a spec names (see the module docstring).

    Args:
        spec: one spec, comma-joined specs, or a list of specs.
        data_dir: root of the built-in catalog datasets (cfg ``DATA_DIR``).
        is_train: chooses default splits (``pennfudan:ROOT``, ``synthetic``).
        filter_empty: when training, drop COCO images without non-crowd objects (cfg ``TRAIN.FILTER_EMPTY_GT``).
        max_image_side: COCO-format images larger than this are decoded reduced (cfg ``DATA_LOADER.MAX_IMAGE_SIDE``;
            None or 0: never).
        box_masks: COCO-format annotations without a segmentation get their box as the mask instead of being
            dropped (for a model without a mask head: ``not cfg.MODEL.MASK_ON``).

    Returns:
        the dataset, or a :class:`ConcatDataset` for several specs.
    """
    if not isinstance(spec, str):
        if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) for s in spec):
            raise DatasetSpecError(f"dataset spec must be a string or a list of strings, got {spec!r}")
        spec = ",".join(spec)
    full = spec
    parts = split_specs(full)
    if not full.strip() or any(not p for p in parts):
        raise DatasetSpecError(f"dataset spec {full!r}: empty dataset name")
    datasets = []
    for part in parts:
        try:
            dataset = _build_one(part, data_dir, is_train, filter_empty, max_image_side or None, box_masks)
        except DatasetSpecError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DatasetSpecError(f"dataset spec {part!r}: {type(e).__name__}: {e}") from e
        if len(dataset) == 0:
            raise DatasetSpecError(f"dataset spec {part!r} gives an empty dataset ({dataset!r})")
        datasets.append(dataset)
    if len(datasets) == 1:
        return datasets[0]
    try:
        return ConcatDataset(datasets)
    except ValueError as e:
        raise DatasetSpecError(f"dataset spec {full!r}: {e}") from e


def _register_synthetic_variants() -> None:
    for variant in SYNTHETIC_VARIANTS:
        for split in ("train", "val"):
            DatasetCatalog.register(f"synthetic_{variant}_{split}",
                                    lambda v=variant, s=split: SyntheticFamilyDataset(v, s))


_register_synthetic_variants()
for _split in ("train", "val"):
    DatasetCatalog.register(f"synthetic_keypoints_{_split}",
                            lambda s=_split: SyntheticShapesDataset(s, keypoints=True))


def check_class_order(trained: Optional[Sequence[str]], dataset) -> None:
    """Raise ConfigError when ``dataset.classes`` holds the same names as ``trained`` (a checkpoint's
    ``classes``) in another order: the model's class k would be scored as the dataset's class k, another
    category (COCO category ids renumbered between two annotation files put the same names in another
    order). Other differences (other names, another count, either list missing) are not checked here."""
    classes = [str(c) for c in (getattr(dataset, "classes", None) or [])]
    trained = [str(c) for c in (trained or [])]
    if not classes or not trained or classes == trained or sorted(classes) != sorted(trained):
        return
    moved = [f"{i}: {t!r} in the checkpoint, {c!r} in the dataset" for i, (t, c) in
             enumerate(zip(trained, classes)) if t != c]
    raise ConfigError(f"the dataset {dataset!r} has the checkpoint's classes in another order ("
                      + "; ".join(moved[:4]) + ("; ..." if len(moved) > 4 else "") + "): its detections would "
                      "be scored against the wrong categories. Give the annotation file the category ids of the "
                      "training file (classes follow the sorted category ids), or retrain on it.")


def check_num_classes(cfg, dataset) -> None:
    """Raise ConfigError when ``cfg.MODEL.NUM_CLASSES`` (background included) differs from the number of
    ``dataset.classes`` (``"__background__"`` first); a dataset without ``classes`` is not checked.

    Every tool calls this right after building a dataset, before any model work.
    """
    classes = list(getattr(dataset, "classes", []) or [])
    if classes and len(classes) != cfg.MODEL.NUM_CLASSES:
        shown = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
        raise ConfigError(f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} but the dataset {dataset!r} has "
                          f"{len(classes)} classes including the background ({shown}); set MODEL.NUM_CLASSES to "
                          f"{len(classes)} (on the command line: --set MODEL.NUM_CLASSES {len(classes)})")
