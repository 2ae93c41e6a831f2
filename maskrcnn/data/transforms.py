"""Joint image/target transforms for the data loader, and the image-reading helpers the datasets share.

A transform is a callable ``t(image, target, generator=None) -> (image, target)`` where

* ``image`` is a ``(3, H, W)`` float32 RGB tensor in ``[0, 1]``;
* ``target`` is the dataset's dict (``boxes (N, 4)`` float32 ``x1, y1, x2, y2`` absolute pixels in the continuous
  convention, ``masks (N, H, W)`` uint8, plus keys the transforms pass through untouched), or ``None``;
* ``generator`` is an optional ``torch.Generator`` for the random draws. The training loader passes one seeded per
  sample so that augmentation is reproducible and resumable; ``None`` draws from the global torch RNG.

Normalisation is not a loader transform: the model's ``Preprocessor`` converts to its pixel order/scale and
normalises. It also resizes, so :class:`ResizeShortestEdge` here is optional: resizing in the workers is a speed
choice (smaller tensors cross the worker pipe; the model's own resize then is a no-op or nearly so, because both use
the same arithmetic).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "hflip",
    "keypoint_flip_indices",
    "check_image_bytes",
    "image_file_size",
    "read_image_rgb",
    "to_float_tensor",
]

Target = Optional[Dict[str, Tensor]]


# ----------------------------------------------------------------------------------------------------------------------
# image helpers
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# Some cameras append data (thumbnails, maker notes) after the JPEG end marker; look for it this far from the end.
_JPEG_TAIL_BYTES = 1 << 16


def _who(path: str, image_id) -> str:
    return f"{path}" + (f" (image id {image_id})" if image_id is not None else "")


def check_image_bytes(path: str, image_id=None) -> None:
    """Cheap checks that need no decoding: the file exists, is not empty, and a JPEG/PNG is not cut short.

    Why the truncation check: OpenCV decodes a truncated JPEG without failing (it prints "Premature end of JPEG
    file" and returns an image whose lower part is grey), which would be a silently wrong training image.

    Raises:
        FileNotFoundError: missing file. OSError: empty or truncated file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {_who(path, image_id)}")
    size = os.path.getsize(path)
    if size == 0:
        raise OSError(f"image file is empty (0 bytes): {_who(path, image_id)}")
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(size - _JPEG_TAIL_BYTES, 0))
        tail = f.read()
    if head[:2] == _JPEG_SOI and _JPEG_EOI not in tail:
        raise OSError(f"truncated JPEG file (no end-of-image marker): {_who(path, image_id)}")
    if head == _PNG_MAGIC and not tail.endswith(_PNG_IEND):
        raise OSError(f"truncated PNG file (no IEND chunk at the end): {_who(path, image_id)}")


def image_file_size(path: str, image_id=None) -> Tuple[int, int]:
    """``(height, width)`` of an image file as displayed (EXIF orientation applied), read from its header only.

    Raises:
        FileNotFoundError / OSError: as :func:`check_image_bytes`, or the file is not an image PIL can identify.
    """
    check_image_bytes(path, image_id)
    with warnings.catch_warnings():
        # A 12000x9000 photo trips PIL's decompression-bomb warning; only the header is read here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
        except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            raise OSError(f"not a readable image file ({type(e).__name__}: {e}): {_who(path, image_id)}") from e
    if width <= 0 or height <= 0:
        raise OSError(f"image has zero size {width}x{height}: {_who(path, image_id)}")
    # Orientations 5..8 transpose the picture (OpenCV applies them when decoding).
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def read_image_rgb(path: str, max_side: Optional[int] = None, image_id=None) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array (OpenCV decoder, as Detectron does).

    Grayscale images are expanded to 3 channels, an alpha channel is dropped, 16-bit images are scaled to 8 bits
    (``v >> 8``, so 65535 -> 255), and a JPEG's EXIF orientation is applied (OpenCV's ``IMREAD_COLOR`` default).

    Args:
        path: image file.
        max_side: when given, an image whose longer side exceeds it is returned resized (area interpolation) so
            that its longer side is ``max_side``. Very large files are decoded with OpenCV's reduced-resolution
            modes (``IMREAD_REDUCED_COLOR_2/4/8``: JPEG decodes at 1/2, 1/4, 1/8 scale directly), so a
            12000x9000 photo never occupies its full-resolution 324 MB in memory. Callers compare the returned
            shape with the original size to scale boxes and masks.
        image_id: named in error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: the file is empty, truncated, not an image, or OpenCV cannot decode it.
    """
    check_image_bytes(path, image_id)
    flags = cv2.IMREAD_COLOR
    if max_side is not None:
        if int(max_side) <= 0:
            raise ValueError(f"read_image_rgb: max_side must be positive, got {max_side!r}")
        max_side = int(max_side)
        try:
            long_side = max(image_file_size(path, image_id))
        except OSError:
            # The header reader cannot identify it; let OpenCV decode it at full size (or say it cannot).
            long_side = 0
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            # Largest reduction that still leaves at least max_side pixels, so the final resize only shrinks.
            if long_side // factor >= max_side:
                flags = reduced
                break
    bgr = cv2.imread(path, flags)
    if bgr is None or bgr.size == 0:
        raise OSError(f"could not decode image file {_who(path, image_id)} (unreadable or not an image)")
    if bgr.dtype != np.uint8:  # IMREAD_COLOR already converts 16-bit to 8-bit; other depths are not expected
        raise OSError(f"image file {_who(path, image_id)} decoded to dtype {bgr.dtype}, expected uint8")
    if max_side is not None and max(bgr.shape[:2]) > max_side:
        h, w = bgr.shape[:2]
        scale = max_side / max(h, w)
        size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_float_tensor(image: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 RGB array -> ``(3, H, W)`` float32 tensor in ``[0, 1]``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def _check_image(image: Tensor, who: str) -> None:
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{who}: image must be a (C, H, W) tensor, got {shape}")


# ----------------------------------------------------------------------------------------------------------------------
# deterministic building blocks
def keypoint_flip_indices(names: Sequence[str]) -> Tensor:
    """``(K,)`` int64: for each keypoint, the index of its mirror image under a horizontal flip, found by the
    ``left_`` / ``right_`` prefixes of COCO's keypoint names (``left_eye`` <-> ``right_eye``; others map to
    themselves)."""
    names = [str(n) for n in names]
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, n in enumerate(names):
        for a, b in (("left_", "right_"), ("right_", "left_"), ("left", "right"), ("right", "left")):
            if n.startswith(a) and b + n[len(a):] in index:
                out.append(index[b + n[len(a):]])
                break
        else:
            out.append(i)
    return torch.tensor(out, dtype=torch.int64)


def hflip(image: Tensor, target: Target = None, keypoint_flip: Optional[Tensor] = None) -> Tuple[Tensor, Target]:
    """Mirror an image and its target left-right.

    Boxes map as ``x1' = W - x2``, ``x2' = W - x1`` (continuous convention: the mirror of pixel column ``c`` is
    ``W - 1 - c``, so a box covering columns ``a..b`` covers ``W-1-b..W-1-a``, i.e. ``[W - (b+1), W - a)``).
    ``keypoints (N, K, 3)`` map as ``x' = W - x`` (torchvision's reference transform) and swap left and right
    with ``keypoint_flip`` (``(K,)`` indices, :func:`keypoint_flip_indices`; required when the target has
    keypoints: a mirrored left eye is a right eye).
    """
    _check_image(image, "hflip")
    width = image.shape[-1]
    image = image.flip(-1)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        flipped = boxes.clone()
        flipped[:, 0] = width - boxes[:, 2]
        flipped[:, 2] = width - boxes[:, 0]
        target["boxes"] = flipped
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kps = target["keypoints"]
        if keypoint_flip is None:
            raise ValueError("hflip: the target has keypoints but no keypoint_flip indices were given; pass the "
                             "dataset's keypoint_flip_indices (RandomHorizontalFlip(p, keypoint_flip=...)) so that "
                             "left and right keypoints swap")
        if keypoint_flip.shape != (kps.shape[1],):
            raise ValueError(f"hflip: keypoint_flip must be ({kps.shape[1]},) for (N, {kps.shape[1]}, 3) keypoints, "
                             f"got {tuple(keypoint_flip.shape)}")
        kps = kps[:, keypoint_flip].clone()
        kps[..., 0] = width - kps[..., 0]
        target["keypoints"] = kps
    return image, target


def _resize(image: Tensor, target: Target, scale: float) -> Tuple[Tensor, Target]:
    h, w = image.shape[-2:]
    # Same call as the model's Preprocessor so that its resize of an already resized image is (close to) a no-op.
    image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                          align_corners=False)[0]
    nh, nw = image.shape[-2:]
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * ratio
    if "keypoints" in target:
        kps = target["keypoints"].clone()
        kps[..., 0] *= nw / w
        kps[..., 1] *= nh / h
        target["keypoints"] = kps
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:
            target["masks"] = masks.new_zeros((0, nh, nw))
        else:
            target["masks"] = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(masks.dtype)
    if "area" in target and "masks" in target:
        # Area follows the segmentation, as in the source annotations.
        target["area"] = target["masks"].flatten(1).sum(1).to(target["area"].dtype)
    return image, target


# ----------------------------------------------------------------------------------------------------------------------
# transform objects
class Compose:
    """Apply transforms in order, handing each the same ``generator``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms: List[Callable] = list(transforms)
        for i, t in enumerate(self.transforms):
            if not callable(t):
                raise TypeError(f"Compose: transforms[{i}] is not callable: {t!r}")

    def __call__(self, image: Tensor, target: Target = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, generator=generator)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip image, boxes, masks and keypoints together with probability ``p`` (see :func:`hflip`;
    ``keypoint_flip``: the left/right swap of the keypoints, needed for targets with keypoints)."""

    def __init__(self, p: float = 0.5, keypoint_flip: Optional[Tensor] = None):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.keypoint_flip = keypoint_flip

    def __call__(self, image: Tensor, target: Target = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Target]:
        # Always draw, even for p in {0, 1}, so that the random stream does not depend on p.
        u = float(torch.rand((), generator=generator))
        if u < self.p:
            return hflip(image, target, self.keypoint_flip)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShortestEdge:
    """Resize so the shorter side is one of ``min_sizes`` (drawn uniformly) unless the longer would exceed ``max_size``.

    The image is resized bilinearly, boxes are scaled by the per-axis size ratio, masks are resized nearest and
    ``area`` (when masks are present) is recomputed from the resized masks. The scale rule and the interpolation
    call are the model ``Preprocessor``'s, so applying this in the loader with the training sizes only moves work
    into the workers; it is optional.

    Args:
        min_sizes: candidate shorter-side sizes (pixels).
        max_size: cap on the longer side (pixels).
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int):
        if isinstance(min_sizes, int):
            min_sizes = (min_sizes,)
        if len(min_sizes) == 0 or any(int(s) <= 0 for s in min_sizes):
            raise ValueError(f"ResizeShortestEdge: min_sizes must be non-empty positive sizes, got {min_sizes!r}")
        if int(max_size) <= 0:
            raise ValueError(f"ResizeShortestEdge: max_size must be positive, got {max_size!r}")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)

    @staticmethod
    def get_scale(height: int, width: int, min_size: int, max_size: int) -> float:
        short, long = float(min(height, width)), float(max(height, width))
        return min(min_size / short, max_size / long)

    def __call__(self, image: Tensor, target: Target = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Target]:
        _check_image(image, "ResizeShortestEdge")
        if len(self.min_sizes) == 1:
            size = self.min_sizes[0]
        else:
            size = self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=generator))]
        h, w = image.shape[-2:]
        scale = self.get_scale(h, w, size, self.max_size)
        if scale == 1.0:
            return image, target
        return _resize(image, target, scale)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"
