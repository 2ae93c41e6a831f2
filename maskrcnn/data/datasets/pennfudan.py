"""The Penn-Fudan pedestrian database, read from the layout its zip unpacks to (as torchvision's detection tutorial).

::

    ROOT/PNGImages/FudanPed00001.png        RGB photo
    ROOT/PedMasks/FudanPed00001_mask.png    instance-id mask: 0 background, 1..N pedestrian N

One class, ``person``. Each instance id ``k`` present in the mask is one object; its mask is ``id == k`` and its box
is the tight box in the continuous convention (``x1 = min col``, ``x2 = max col + 1``, same for rows). ``area`` is
the mask's pixel count (COCO's definition) and ``iscrowd`` is 0.

Split rule (deterministic): the image names sorted; the last ``num_test`` are ``"test"``, the rest ``"train"``;
``"all"`` is every image. The full database has 170 images, so the default ``num_test=50`` gives 120/50. A copy with
fewer than ``num_test`` images puts all of them in ``"test"`` and leaves ``"train"`` empty, which is an error: use
``split="all"`` (spec ``pennfudan:ROOT:all``) or a smaller ``num_test``. ``image_id`` is the image's position in the
sorted list of all images, so it is the same whichever split holds it.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import read_image_rgb, to_float_tensor

__all__ = ["PennFudanDataset", "png_size"]

_SPLITS = ("train", "test", "all")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of a PNG file from its IHDR chunk, without decoding pixels."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR":
        raise OSError(f"not a PNG file (no IHDR header): {path}")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


class PennFudanDataset(Dataset):
    """Penn-Fudan pedestrians (see the module docstring for layout, split rule and target fields).

    Args:
        root: folder holding ``PNGImages/`` and ``PedMasks/``.
        split: ``"train"``, ``"test"`` or ``"all"``.
        transforms: optional ``t(image, target) -> (image, target)``.
        num_test: number of images (the last ones in name order) in the test split.
    """

    classes: List[str] = ["__background__", "person"]

    def __init__(self, root: str, split: str = "train", transforms=None, num_test: int = 50):
        if split not in _SPLITS:
            raise ValueError(f"PennFudanDataset: split must be one of {_SPLITS}, got {split!r}")
        if int(num_test) < 0:
            raise ValueError(f"PennFudanDataset: num_test must be >= 0, got {num_test!r}")
        image_dir, mask_dir = os.path.join(root, "PNGImages"), os.path.join(root, "PedMasks")
        for d in (image_dir, mask_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"PennFudanDataset: {d} not found; root {root!r} must hold PNGImages/ "
                                        f"and PedMasks/ (the PennFudanPed.zip layout)")
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(".png"))
        if not names:
            raise FileNotFoundError(f"PennFudanDataset: no .png images in {image_dir}")
        for n in names:
            mask = os.path.join(mask_dir, n[:-4] + "_mask.png")
            if not os.path.isfile(mask):
                raise FileNotFoundError(f"PennFudanDataset: image {n} has no mask file {mask}")
        self.root = root
        self.split = split
        self.num_test = int(num_test)
        self.transforms = transforms
        n_train = max(len(names) - self.num_test, 0)
        positions = list(range(len(names)))
        if split == "train":
            positions = positions[:n_train]
        elif split == "test":
            positions = positions[n_train:]
        if not positions:
            raise ValueError(f"PennFudanDataset: split {split!r} of {root} is empty ({len(names)} images, the last "
                             f"num_test={self.num_test} are 'test'); use split='all' or a smaller num_test")
        self._all_names = names
        #: dataset index -> position in the sorted list of all images (the image id).
        self._positions: List[int] = positions
        self._sizes: Dict[int, Tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._positions)

    def _paths(self, index: int) -> Tuple[str, str]:
        name = self._all_names[self._positions[index]]
        return (os.path.join(self.root, "PNGImages", name),
                os.path.join(self.root, "PedMasks", name[:-4] + "_mask.png"))

    def get_image_info(self, index: int) -> Dict[str, Any]:
        """``{"file_name", "height", "width", "id"}``; the size comes from the PNG header (no pixels read)."""
        pos = self._positions[index]
        if pos not in self._sizes:
            self._sizes[pos] = png_size(self._paths(index)[0])
        height, width = self._sizes[pos]
        return {"file_name": os.path.join("PNGImages", self._all_names[pos]), "height": height, "width": width,
                "id": pos}

    def image_files(self, index: int) -> List[Tuple[str, Any]]:
        """``[(image path, None), (mask path, None)]``: the files item ``index`` reads (the mask must match the
        image's size); used by :func:`maskrcnn.data.validate.validate_dataset`."""
        image_path, mask_path = self._paths(index)
        return [(image_path, None), (mask_path, None)]

    @staticmethod
    def read_instance_mask(path: str) -> np.ndarray:
        """The ``(H, W)`` instance-id array of a ``*_mask.png``.

        PIL, not OpenCV: the database's masks may be palette PNGs, whose pixel values are the instance ids;
        OpenCV would expand the palette to colours.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"mask {path} has PIL mode {im.mode!r}; expected a single-channel instance-id PNG")
            return np.array(im)

    def get_target(self, index: int) -> Dict[str, Tensor]:
        """The target of item ``index`` from its mask file alone."""
        ids = self.read_instance_mask(self._paths(index)[1])
        obj_ids = np.unique(ids)
        obj_ids = obj_ids[obj_ids != 0]
        masks = (ids[None] == obj_ids[:, None, None]).astype(np.uint8)
        boxes = np.zeros((len(obj_ids), 4), dtype=np.float32)
        for k, m in enumerate(masks):
            rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        n = len(obj_ids)
        return {
            "boxes": torch.from_numpy(boxes).reshape(n, 4),
            "labels": torch.ones((n,), dtype=torch.int64),
            "masks": torch.from_numpy(masks).reshape(n, *ids.shape),
            "image_id": torch.tensor(self._positions[index], dtype=torch.int64),
            "area": torch.from_numpy(masks.reshape(n, -1).sum(1).astype(np.float32)),
            "iscrowd": torch.zeros((n,), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image_path, mask_path = self._paths(index)
        rgb = read_image_rgb(image_path, image_id=self._positions[index])
        target = self.get_target(index)
        if tuple(target["masks"].shape[-2:]) != rgb.shape[:2]:
            raise ValueError(f"PennFudanDataset: mask {mask_path} is {tuple(target['masks'].shape[-2:])} but image "
                             f"{image_path} is {rgb.shape[:2]}")
        image = to_float_tensor(rgb)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"PennFudanDataset(root={self.root!r}, split={self.split!r}, images={len(self)})"
