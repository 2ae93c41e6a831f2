"""A family of synthetic instance-segmentation sets: named variants that differ the way users' datasets differ.

The built-in :class:`~maskrcnn.data.datasets.synthetic.SyntheticShapesDataset` is one easy set (128x128 images, one
saturated colour per class). The variants here span what a recipe must adapt to, so that a recipe tuned on some of
them can be checked on others (``held_out``):

* image sizes from 96 to 512 pixels a side, square or not, varying within a set;
* object sizes from 4 pixels to 95% of the image's shorter side;
* 3-10 classes drawn from twelve shapes, including thin (``bar``), hollow (``ring``, ``frame``) and concave
  (``lshape``, ``star``, ``crescent``, ``cross``) ones;
* occlusion (later shapes paint over earlier ones; each mask is the visible part), crowd regions (a packed cluster of
  small shapes of one class annotated as one ``iscrowd`` instance), empty images;
* plain, gradient, noisy and textured backgrounds;
* every instance gets a random colour (any hue) with enough contrast to its background, so the colour never gives
  the class away: only the shape does.

Items follow the dataset contract of :mod:`maskrcnn.data.datasets` (``(3, H, W)`` float RGB in ``[0, 1]``, boxes
``x1, y1, x2, y2`` continuous convention, labels ``1..K``, masks ``(N, H, W)`` uint8, ``area``, ``iscrowd``) and are
deterministic: item ``i`` of split ``s`` of variant ``v`` depends only on ``(seed, v, s, i)``. Build one with
``SyntheticFamilyDataset("tiny", "train")``, the dataset spec ``synthetic:tiny:train`` or the catalog name
``synthetic_tiny_train``; ``tools/export_synthetic.py`` writes a split as COCO json + PNG images.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from .synthetic import _shape_mask, item_to_tensors

__all__ = ["VariantSpec", "VARIANTS", "FAMILY_SHAPES", "SyntheticFamilyDataset", "variant_names", "shape_mask"]

#: Every shape the family can draw (class names). Thin: bar. Hollow: ring, frame. Concave: lshape, star, crescent,
#: cross.
FAMILY_SHAPES: Tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "diamond", "hexagon", "bar", "ring",
                                  "frame", "lshape", "star", "crescent")
BACKGROUNDS = ("plain", "gradient", "noisy", "textured")
_SPLIT_CODES = {"train": 0, "val": 1}
_MAX_TRIES = 12


@dataclass(frozen=True)
class VariantSpec:
    """What one variant of the family draws.

    Attributes:
        name: the variant's name (catalog names ``synthetic_<name>_<split>``).
        description: one line for listings.
        classes: shape names (from :data:`FAMILY_SHAPES`); label ``k`` is ``classes[k - 1]``.
        height, width: ranges ``(lo, hi)`` of the image sides in pixels (inclusive); ``square`` draws one side.
        object_size: range of an object's nominal side as fractions of the image's shorter side.
        min_object_px: smallest nominal object side in pixels whatever the fraction gives.
        objects: range of the number of objects in a non-empty image.
        min_visible: smallest visible fraction of an occluded instance.
        backgrounds: background kinds drawn from (``plain``, ``gradient``, ``noisy``, ``textured``).
        empty_fraction: probability that an image holds no object at all.
        crowd_fraction: probability that an image holds one crowd region.
        held_out: True when the variant was kept out of every recipe choice (a check of generalisation).
        num_images: default dataset sizes ``(train, val)``.
    """

    name: str
    description: str
    classes: Tuple[str, ...]
    height: Tuple[int, int]
    width: Tuple[int, int]
    square: bool
    object_size: Tuple[float, float]
    objects: Tuple[int, int]
    backgrounds: Tuple[str, ...]
    min_object_px: int = 4
    min_visible: float = 0.3
    empty_fraction: float = 0.0
    crowd_fraction: float = 0.0
    held_out: bool = False
    num_images: Tuple[int, int] = (512, 100)
    extra: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        bad = [c for c in self.classes if c not in FAMILY_SHAPES]
        if bad or not 1 <= len(self.classes) <= len(FAMILY_SHAPES) or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"variant {self.name!r}: classes must be distinct names from {FAMILY_SHAPES}, "
                             f"got {self.classes}")
        if not (16 <= self.height[0] <= self.height[1] and 16 <= self.width[0] <= self.width[1]):
            raise ValueError(f"variant {self.name!r}: bad image size ranges {self.height}, {self.width}")
        if not 0.0 < self.object_size[0] <= self.object_size[1] <= 1.0:
            raise ValueError(f"variant {self.name!r}: object_size must be fractions 0 < lo <= hi <= 1, got "
                             f"{self.object_size}")
        if not 0 <= self.objects[0] <= self.objects[1] or self.objects[1] < 1:
            raise ValueError(f"variant {self.name!r}: bad objects range {self.objects}")
        if not set(self.backgrounds) <= set(BACKGROUNDS) or not self.backgrounds:
            raise ValueError(f"variant {self.name!r}: backgrounds must be from {BACKGROUNDS}, got {self.backgrounds}")


def _v(**kw) -> VariantSpec:
    spec = VariantSpec(**kw)
    spec.check()
    return spec


#: The named variants. The first six were used while choosing the ``--auto`` rules; the ``held_out`` ones never were.
#: ``span`` (added after the others) has objects from a few pixels to most of the image, so that RoIs come from
#: every FPN level, as in ``mixed``, where the first recipe failed.
VARIANTS: Dict[str, VariantSpec] = {v.name: v for v in (
    _v(name="basic", description="128x128, 3 classes, 10-60 px objects, plain/noisy backgrounds",
       classes=("rectangle", "ellipse", "triangle"), height=(128, 128), width=(128, 128), square=True,
       object_size=(0.08, 0.47), objects=(1, 4), backgrounds=("plain", "noisy")),
    _v(name="tiny", description="160-224 px, 4 classes, 4-16 px objects, up to 12 per image",
       classes=("rectangle", "ellipse", "triangle", "cross"), height=(160, 224), width=(160, 224), square=True,
       object_size=(0.025, 0.075), objects=(3, 12), backgrounds=("plain", "gradient", "noisy")),
    _v(name="large", description="256-384 px, 5 classes, objects 35-95% of the image, occluding each other",
       classes=("rectangle", "ellipse", "triangle", "diamond", "hexagon"), height=(256, 384), width=(256, 384),
       square=False, object_size=(0.35, 0.95), objects=(1, 3), backgrounds=("gradient", "textured")),
    _v(name="thin", description="160-192 px, thin/hollow/concave shapes: bar, ring, frame, lshape, cross",
       classes=("bar", "ring", "frame", "lshape", "cross"), height=(160, 192), width=(160, 192), square=True,
       object_size=(0.15, 0.6), objects=(1, 5), backgrounds=("plain", "gradient")),
    _v(name="crowd", description="224-288 px, 6 classes, crowd regions, occlusion, 10% empty images",
       classes=("rectangle", "ellipse", "triangle", "star", "ring", "lshape"), height=(224, 288), width=(224, 288),
       square=False, object_size=(0.06, 0.3), objects=(2, 10), backgrounds=("noisy", "textured"),
       empty_fraction=0.1, crowd_fraction=0.5),
    _v(name="span", description="192-448 px, 6 classes, objects 3-85% of the image: every FPN level in one set",
       classes=("rectangle", "triangle", "diamond", "cross", "ring", "star"), height=(192, 448), width=(192, 448),
       square=False, object_size=(0.03, 0.85), objects=(1, 6), backgrounds=BACKGROUNDS, empty_fraction=0.1),
    _v(name="ten", description="192-256 px, 10 classes, all backgrounds, 10% empty images",
       classes=("rectangle", "ellipse", "triangle", "cross", "diamond", "hexagon", "bar", "ring", "star", "crescent"),
       height=(192, 256), width=(192, 256), square=False, object_size=(0.1, 0.4), objects=(1, 6),
       backgrounds=BACKGROUNDS, empty_fraction=0.1, held_out=True),
    _v(name="mixed", description="128-512 px, 8 classes, 3-80% objects, crowds, 15% empty images",
       classes=("rectangle", "ellipse", "triangle", "hexagon", "bar", "frame", "lshape", "crescent"),
       height=(128, 512), width=(128, 512), square=False, object_size=(0.03, 0.8), objects=(1, 8),
       backgrounds=BACKGROUNDS, empty_fraction=0.15, crowd_fraction=0.2, held_out=True),
    _v(name="wide", description="panoramas 96-144 x 320-480 px, 4 classes incl. thin and concave",
       classes=("bar", "crescent", "star", "hexagon"), height=(96, 144), width=(320, 480), square=False,
       object_size=(0.2, 0.8), objects=(1, 6), backgrounds=("gradient", "textured"), held_out=True),
)}


def variant_names(held_out: Optional[bool] = None) -> List[str]:
    """Variant names in definition order; ``held_out`` True/False keeps only held-out / tuning variants."""
    return [n for n, v in VARIANTS.items() if held_out is None or v.held_out == held_out]


# --- shapes -------------------------------------------------------------------------------------------------------
def _box_for(name: str, size: float, rng: np.random.Generator) -> Tuple[int, int, int]:
    """``(w, h, orientation)`` of a shape of nominal side ``size``: most shapes get an aspect jitter; bars are thin."""
    orient = int(rng.integers(4))
    if name == "bar":
        long_side = size * 1.4
        short = max(2.0, long_side / rng.uniform(5.0, 10.0))
        if orient < 2:  # horizontal or vertical: a thin box
            w, h = (long_side, short) if orient == 0 else (short, long_side)
            return max(int(round(w)), 2), max(int(round(h)), 2), orient
        side = long_side / 1.4142
        return max(int(round(side)), 3), max(int(round(side)), 3), orient  # diagonal bar inside a square box
    aspect = float(np.exp(rng.uniform(-0.4, 0.4)))
    return max(int(round(size * aspect)), 3), max(int(round(size / aspect)), 3), orient


def shape_mask(name: str, x: int, y: int, w: int, h: int, height: int, width: int, orient: int) -> np.ndarray:
    """Rasterise shape ``name`` inside the box ``[x, x + w) x [y, y + h)`` as an ``(height, width)`` uint8 {0,1}
    mask (no anti-aliasing, so painted pixels and mask agree exactly)."""
    if name in ("rectangle", "ellipse", "triangle", "cross", "diamond", "hexagon"):
        return _shape_mask(name, x, y, w, h, height, width, orient)
    m = np.zeros((height, width), dtype=np.uint8)
    r, b = x + w - 1, y + h - 1
    if name == "bar":
        if orient < 2:
            m[y:y + h, x:x + w] = 1
        else:
            t = max(2, int(round(min(w, h) / 7.0)))
            p, q = ((x, y), (r, b)) if orient == 2 else ((x, b), (r, y))
            cv2.line(m, p, q, 1, thickness=t, lineType=cv2.LINE_8)
            m[:y, :] = 0
            m[b + 1:, :] = 0
            m[:, :x] = 0
            m[:, r + 1:] = 0
    elif name in ("ring", "frame"):
        t = max(2, int(round(min(w, h) * 0.18)))
        if name == "ring":
            center, axes = (x + (w - 1) // 2, y + (h - 1) // 2), ((w - 1) // 2, (h - 1) // 2)
            cv2.ellipse(m, center, axes, 0, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
            inner = (max(axes[0] - t, 1), max(axes[1] - t, 1))
            cv2.ellipse(m, center, inner, 0, 0, 360, 0, thickness=-1, lineType=cv2.LINE_8)
        else:
            m[y:y + h, x:x + w] = 1
            m[y + t:y + h - t, x + t:x + w - t] = 0
    elif name == "lshape":
        m[y:y + h, x:x + w] = 1
        cw, ch = max(int(w * 0.55), 1), max(int(h * 0.55), 1)
        cx = x + w - cw if orient in (0, 3) else x
        cy = y if orient in (0, 1) else y + h - ch
        m[cy:cy + ch, cx:cx + cw] = 0
    elif name == "star":
        cx, cy = x + (w - 1) / 2.0, y + (h - 1) / 2.0
        angles = -np.pi / 2 + orient * np.pi / 10 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([cx + radii * np.cos(angles) * (w - 1) / 2.0, cy + radii * np.sin(angles) * (h - 1) / 2.0], 1)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    elif name == "crescent":
        center, axes = (x + (w - 1) // 2, y + (h - 1) // 2), ((w - 1) // 2, (h - 1) // 2)
        cv2.ellipse(m, center, axes, 0, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
        dx, dy = [(1, 0), (0, 1), (-1, 0), (0, -1)][orient]
        shifted = (center[0] + int(round(dx * w * 0.4)), center[1] + int(round(dy * h * 0.4)))
        cv2.ellipse(m, shifted, axes, 0, 0, 360, 0, thickness=-1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown shape {name!r}; known: {FAMILY_SHAPES}")
    return m


# --- backgrounds and colours -----------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour of any hue, saturation 0.15-1 and value 0.2-1 (float32, 0..255)."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(40, 255), rng.uniform(50, 255)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).reshape(3).astype(np.float32)


def _background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``(height, width, 3)`` float32 RGB in 0..255."""
    if kind == "plain":
        return np.broadcast_to(_random_colour(rng), (height, width, 3)).astype(np.float32)
    if kind in ("gradient", "noisy"):
        a, b = _random_colour(rng), _random_colour(rng)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        image = a + t[:, :, None] * (b - a)
        if kind == "noisy":
            image = image + rng.normal(0.0, rng.uniform(10.0, 22.0), size=image.shape).astype(np.float32)
        return image.astype(np.float32)
    if kind == "textured":
        base = _random_colour(rng)
        coarse = rng.uniform(-45.0, 45.0, size=(5, 5, 3)).astype(np.float32)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) + base
        period = rng.uniform(4.0, 14.0)
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))
        image += (rng.uniform(8.0, 22.0) * stripes)[:, :, None]
        # Low-contrast clutter: outlines that are no object (the model must not detect texture).
        clutter = np.zeros((height, width), np.float32)
        for _ in range(int(rng.integers(2, 7))):
            c = (int(rng.integers(width)), int(rng.integers(height)))
            ax = (int(rng.integers(3, max(4, width // 6))), int(rng.integers(3, max(4, height // 6))))
            cv2.ellipse(clutter, c, ax, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(-30.0, 30.0)),
                        thickness=1)
        image += clutter[:, :, None]
        return image.astype(np.float32)
    raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least ~60 RGB units from ``under`` (the mean background colour below the shape)."""
    best, best_d = None, -1.0
    for _ in range(8):
        c = _random_colour(rng)
        d = float(np.linalg.norm(c - under))
        if d >= 60.0:
            return c
        if d > best_d:
            best, best_d = c, d
    return np.clip(255.0 - under, 0, 255).astype(np.float32) if best_d < 40.0 else best


class SyntheticFamilyDataset(Dataset):
    """One split of a named variant (see the module docstring and :data:`VARIANTS`).

    Args:
        variant: a name from :data:`VARIANTS` or a :class:`VariantSpec`.
        split: ``"train"`` or ``"val"``.
        num_images: dataset length; None gives the variant's default for the split.
        seed: base seed; items depend on ``(seed, variant name, split, index)`` only.
        transforms: optional ``t(image, target) -> (image, target)``.
    """

    def __init__(self, variant="basic", split: str = "train", num_images: Optional[int] = None, seed: int = 0,
                 transforms=None):
        if isinstance(variant, str):
            if variant not in VARIANTS:
                raise ValueError(f"SyntheticFamilyDataset: unknown variant {variant!r}; known: {list(VARIANTS)}")
            variant = VARIANTS[variant]
        if not isinstance(variant, VariantSpec):
            raise TypeError(f"SyntheticFamilyDataset: variant must be a name or a VariantSpec, got {variant!r}")
        variant.check()
        if split not in _SPLIT_CODES:
            raise ValueError(f"SyntheticFamilyDataset: split must be one of {tuple(_SPLIT_CODES)}, got {split!r}")
        if num_images is None:
            num_images = variant.num_images[_SPLIT_CODES[split]]
        if int(num_images) <= 0:
            raise ValueError(f"SyntheticFamilyDataset: num_images must be positive, got {num_images!r}")
        self.spec = variant
        self.split = split
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.transforms = transforms
        self.classes: List[str] = ["__background__"] + list(variant.classes)
        self._variant_code = zlib.crc32(variant.name.encode("utf-8"))

    def __len__(self) -> int:
        return self.num_images

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= int(index) < self.num_images:
            raise IndexError(f"SyntheticFamilyDataset: index {index} out of range for {self.num_images} images")
        return np.random.default_rng([self.seed, self._variant_code, _SPLIT_CODES[self.split], int(index)])

    def _size(self, rng: np.random.Generator) -> Tuple[int, int]:
        s = self.spec
        height = int(rng.integers(s.height[0], s.height[1] + 1))
        width = height if s.square else int(rng.integers(s.width[0], s.width[1] + 1))
        return height, width

    def get_image_info(self, index: int) -> Dict[str, Any]:
        height, width = self._size(self._rng(index))  # the size is the stream's first draw: no pixels made
        return {"file_name": f"synthetic_{self.spec.name}/{self.split}/{index:06d}.png", "height": height,
                "width": width, "id": int(index)}

    # --- generation --------------------------------------------------------------------------------------------
    def _place(self, rng, label: int, size: float, height: int, width: int, full, visible, crowd_flags
               ) -> Optional[np.ndarray]:
        name = self.spec.classes[label - 1]
        for _ in range(_MAX_TRIES):
            w, h, orient = _box_for(name, size, rng)
            w, h = min(w, width), min(h, height)
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            m = shape_mask(name, x, y, w, h, height, width, orient)
            if m.sum() < 6:
                continue
            uncovered = m == 0
            if all(c or np.count_nonzero(v & uncovered) >= self.spec.min_visible * f.sum()
                   for v, f, c in zip(visible, full, crowd_flags)):
                return m
        return None

    def _crowd(self, rng, image, height: int, width: int) -> Tuple[int, np.ndarray]:
        """A packed cluster of 8-20 small shapes of one class in a region of 25-45% of the image side."""
        label = int(rng.integers(1, len(self.spec.classes) + 1))
        name = self.spec.classes[label - 1]
        short = min(height, width)
        rw, rh = (max(int(short * rng.uniform(0.25, 0.45)), 12) for _ in range(2))
        rx, ry = int(rng.integers(0, width - rw + 1)), int(rng.integers(0, height - rh + 1))
        union = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(8, 21))):
            size = max(4.0, min(rw, rh) * rng.uniform(0.18, 0.32))
            w, h, orient = _box_for(name, size, rng)
            w, h = min(w, rw), min(h, rh)
            x, y = rx + int(rng.integers(0, rw - w + 1)), ry + int(rng.integers(0, rh - h + 1))
            m = shape_mask(name, x, y, w, h, height, width, orient).astype(bool)
            under = image[m].mean(0) if m.any() else image.mean((0, 1))
            image[m] = _contrasting_colour(rng, under)
            union |= m
        return label, union

    def generate(self, index: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Item ``index`` as an ``(H, W, 3)`` float32 RGB array in ``[0, 1]`` and numpy target fields (``boxes``,
        ``labels``, ``masks`` visible parts, ``area``, ``iscrowd``)."""
        rng = self._rng(index)
        s = self.spec
        height, width = self._size(rng)
        image = _background(s.backgrounds[int(rng.integers(len(s.backgrounds)))], height, width, rng)
        full: List[np.ndarray] = []
        visible: List[np.ndarray] = []
        labels: List[int] = []
        crowd: List[bool] = []
        empty = rng.random() < s.empty_fraction
        if not empty and rng.random() < s.crowd_fraction:
            label, union = self._crowd(rng, image, height, width)
            full.append(union.astype(np.uint8))
            visible.append(union.copy())
            labels.append(label)
            crowd.append(True)
        count = 0 if empty else int(rng.integers(s.objects[0], s.objects[1] + 1))
        short = min(height, width)
        for _ in range(count):
            label = int(rng.integers(1, len(s.classes) + 1))
            # Sizes log-uniform: as many small objects as large ones within the range.
            lo, hi = np.log(max(s.object_size[0] * short, s.min_object_px)), np.log(max(s.object_size[1] * short,
                                                                                          s.min_object_px))
            size = float(np.exp(rng.uniform(lo, hi)))
            m = self._place(rng, label, size, height, width, full, visible, crowd)
            if m is None:
                continue
            covered = m.astype(bool)
            under = image[covered].mean(0)
            colour = _contrasting_colour(rng, under)
            # A mild shading across the object, so that its pixels are not one flat value.
            shade = rng.uniform(-0.12, 0.12, size=2).astype(np.float32)
            ys, xs = np.nonzero(covered)
            ramp = 1.0 + shade[0] * (xs - xs.mean()) / max(float(np.ptp(xs)), 1.0) \
                + shade[1] * (ys - ys.mean()) / max(float(np.ptp(ys)), 1.0)
            image[ys, xs] = colour[None, :] * ramp[:, None].astype(np.float32)
            visible = [v & ~covered for v in visible]
            full.append(m)
            visible.append(covered.copy())
            labels.append(label)
            crowd.append(False)
        # Drop instances occlusion erased (crowd regions may be covered partly; a vanished one is dropped too).
        keep = [k for k, v in enumerate(visible) if v.any()]
        noise = rng.random(image.shape, dtype=np.float32)
        noise -= 0.5
        noise *= 16.0
        image += noise
        np.clip(image, 0.0, 255.0, out=image)
        image *= 1.0 / 255.0
        masks = (np.stack([visible[k] for k in keep]).astype(np.uint8) if keep
                 else np.zeros((0, height, width), np.uint8))
        boxes = np.zeros((len(keep), 4), dtype=np.float32)
        for j, mk in enumerate(masks):
            cols, rows = np.nonzero(mk.any(axis=0))[0], np.nonzero(mk.any(axis=1))[0]
            boxes[j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        target = {"boxes": boxes, "labels": np.asarray([labels[k] for k in keep], dtype=np.int64), "masks": masks,
                  "area": masks.reshape(len(keep), height * width).sum(1).astype(np.float32),
                  "iscrowd": np.asarray([int(crowd[k]) for k in keep], dtype=np.int64)}
        return image, target

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image, target = item_to_tensors(index, *self.generate(index))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"SyntheticFamilyDataset(variant={self.spec.name!r}, split={self.split!r}, "
                f"num_images={self.num_images}, seed={self.seed})")
