"""Input preprocessing and output postprocessing: the only place that knows about pixel formats and sizes.

Images enter the model as a list of ``(3, H, W)`` float RGB tensors in ``[0, 1]`` of any sizes. They are

1. converted to the network's channel order and value range (``PIXEL_ORDER``, ``PIXEL_SCALE``) and normalised with
   ``PIXEL_MEANS`` / ``PIXEL_STDS``;
2. resized so that the shorter side is ``min_size`` unless the longer side would exceed ``max_size``;
3. zero-padded at the bottom/right to a common size that is a multiple of ``size_divisibility`` (0 or 1: the
   largest image's size).

Two resize methods (``RESIZE_METHOD``):

* ``"torchvision"``: steps 1 then 2, bilinear ``F.interpolate`` (``recompute_scale_factor=True``: output side
  ``floor(side * scale)``, no antialiasing), the arithmetic of torchvision's ``GeneralizedRCNNTransform``;
* ``"detectron2"``: step 2 then 1, as detectron2's ``ResizeShortestEdge`` + ``preprocess_image``: output side
  ``int(side * scale + 0.5)`` (its ``get_output_shape``), PIL's antialiased bilinear resize of the image rounded to
  8 bits (:func:`~maskrcnn.ops.pil_resize.pil_bilinear_resize`, bit-exact), then normalised.

Training targets are scaled along (boxes and keypoints by the per-axis size ratio, masks by nearest resizing).
``postprocess`` maps detections back: boxes and keypoints to input-image pixels (``TEST.DETECTOR_POSTPROCESS``),
masks pasted into the input image (``TEST.MASK_PASTE_METHOD``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.masks import MASK_PASTE_METHODS, paste_masks_by_method
from ..ops.pil_resize import pil_bilinear_resize

__all__ = ["ImageList", "Preprocessor", "resize_boxes", "resize_keypoints", "RESIZE_METHODS", "MASK_PASTE_METHODS",
           "DETECTOR_POSTPROCESS_METHODS"]

RESIZE_METHODS = ("torchvision", "detectron2")
DETECTOR_POSTPROCESS_METHODS = ("torchvision", "detectron2")


@dataclass
class ImageList:
    """A padded batch.

    Attributes:
        tensors: ``(N, 3, Hp, Wp)`` normalised network input, zero-padded at the bottom/right.
        image_sizes: ``(h, w)`` of each resized image before padding.
        scales: resize factor applied to each input image (``h / original_h`` up to rounding).
    """

    tensors: Tensor
    image_sizes: List[Tuple[int, int]]
    scales: List[float]

    def to(self, device) -> "ImageList":
        return ImageList(self.tensors.to(device), self.image_sizes, self.scales)

    @property
    def im_info(self) -> Tensor:
        """Detectron's ``im_info``: ``(N, 3)`` float rows ``[height, width, scale]`` of the network input."""
        rows = [[float(h), float(w), float(s)] for (h, w), s in zip(self.image_sizes, self.scales)]
        return torch.tensor(rows, dtype=torch.float32, device=self.tensors.device).reshape(-1, 3)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale ``(N, 4)`` xyxy boxes from an image of ``original_size`` (h, w) to one of ``new_size`` (h, w)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        original_size[0], dtype=torch.float32, device=boxes.device)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        original_size[1], dtype=torch.float32, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def resize_keypoints(keypoints: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale ``(N, K, 3)`` keypoints ``x, y, v`` (``v`` kept) from ``original_size`` (h, w) to ``new_size``
    (torchvision's ``resize_keypoints``)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32, device=keypoints.device) / torch.tensor(
        original_size[0], dtype=torch.float32, device=keypoints.device)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32, device=keypoints.device) / torch.tensor(
        original_size[1], dtype=torch.float32, device=keypoints.device)
    out = keypoints.clone()
    out[..., 0] *= ratio_w
    out[..., 1] *= ratio_h
    return out


class Preprocessor(nn.Module):
    """Resize, normalise and batch images (and their targets); map detections back.

    Args:
        min_size: shorter-side sizes; training draws one per image, evaluation uses the last.
        max_size: longest side after resizing.
        pixel_mean, pixel_std: per-channel statistics in ``pixel_order`` / ``pixel_scale`` units.
        pixel_order: ``"RGB"`` or ``"BGR"``: channel order the network expects.
        pixel_scale: ``1.0`` (inputs in [0, 1]) or ``255.0`` (inputs in [0, 255]).
        size_divisibility: the padded batch size is a multiple of this (32 for FPN); 0 or 1 pads to the largest
            image only.
        mask_paste_padding: border (pixels) added around each M x M mask before it is pasted (torchvision method).
        test_min_size, test_max_size: evaluation size (default: the last ``min_size`` and ``max_size``); a call may
            override it with ``forward(..., min_size=, max_size=)``.
        resize_method: ``"torchvision"`` or ``"detectron2"`` (see the module docstring).
        mask_paste_method: ``"torchvision"`` (:func:`~maskrcnn.ops.masks.paste_masks_in_image`) or
            ``"detectron2"`` (:func:`~maskrcnn.ops.grid_paste.paste_masks_grid_sample`).
        detector_postprocess: ``"torchvision"`` (boxes scaled by the size ratio) or ``"detectron2"`` (its
            ``detector_postprocess``: scaled in place by Python-float factors, clipped to the original image,
            boxes with a side ``<= 0`` dropped with their scores, labels and masks).
    """

    def __init__(self, min_size: Sequence[int], max_size: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], pixel_order: str = "RGB", pixel_scale: float = 1.0,
                 size_divisibility: int = 32, mask_paste_padding: int = 1,
                 test_min_size: Optional[int] = None, test_max_size: Optional[int] = None,
                 resize_method: str = "torchvision", mask_paste_method: str = "torchvision",
                 detector_postprocess: str = "torchvision"):
        super().__init__()
        for name, value, allowed in (("resize_method", resize_method, RESIZE_METHODS),
                                     ("mask_paste_method", mask_paste_method, MASK_PASTE_METHODS),
                                     ("detector_postprocess", detector_postprocess, DETECTOR_POSTPROCESS_METHODS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if int(size_divisibility) < 0:
            raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility!r}")
        self.resize_method = resize_method
        self.mask_paste_method = mask_paste_method
        self.detector_postprocess = detector_postprocess
        if isinstance(min_size, int):
            min_size = (min_size,)
        if not min_size or any(s <= 0 for s in min_size):
            raise ValueError(f"min_size must be a non-empty sequence of positive sizes, got {min_size!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size!r}")
        if pixel_order not in ("RGB", "BGR"):
            raise ValueError(f"pixel_order must be 'RGB' or 'BGR', got {pixel_order!r}")
        self.min_size = tuple(int(s) for s in min_size)
        self.max_size = int(max_size)
        # Evaluation size; torchvision's rule (the last training size) unless given.
        self.test_min_size = int(test_min_size if test_min_size is not None else self.min_size[-1])
        self.test_max_size = int(test_max_size if test_max_size is not None else self.max_size)
        self.pixel_order = pixel_order
        self.pixel_scale = float(pixel_scale)
        self.size_divisibility = int(size_divisibility)
        self.mask_paste_padding = int(mask_paste_padding)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_cfg(cls, cfg) -> "Preprocessor":
        return cls(
            min_size=tuple(cfg.TRAIN.SCALES), max_size=cfg.TRAIN.MAX_SIZE,
            test_min_size=cfg.TEST.SCALE, test_max_size=cfg.TEST.MAX_SIZE,
            pixel_mean=cfg.PIXEL_MEANS, pixel_std=cfg.PIXEL_STDS, pixel_order=cfg.PIXEL_ORDER,
            pixel_scale=cfg.PIXEL_SCALE, size_divisibility=int(cfg.SIZE_DIVISIBILITY),
            mask_paste_padding=cfg.TEST.MASK_PASTE_PADDING, resize_method=cfg.RESIZE_METHOD,
            mask_paste_method=cfg.TEST.MASK_PASTE_METHOD, detector_postprocess=cfg.TEST.DETECTOR_POSTPROCESS,
        )

    # --- sizes ----------------------------------------------------------------------------------------------------
    def _target_sizes(self, min_size: Optional[int] = None, max_size: Optional[int] = None
                      ) -> Tuple[Tuple[int, ...], int]:
        if min_size is not None or max_size is not None:
            if min_size is None or max_size is None or int(min_size) <= 0 or int(max_size) <= 0:
                raise ValueError(f"an explicit size needs both min_size and max_size, positive; got "
                                 f"min_size={min_size!r}, max_size={max_size!r}")
            return (int(min_size),), int(max_size)
        if self.training:
            return self.min_size, self.max_size
        return (self.test_min_size,), self.test_max_size

    @staticmethod
    def compute_scale(height: int, width: int, min_size: float, max_size: float) -> float:
        """Resize factor of an ``height x width`` image (shorter side to min_size, longer side capped)."""
        short, long = float(min(height, width)), float(max(height, width))
        return min(min_size / short, max_size / long)

    @staticmethod
    def detectron2_output_shape(height: int, width: int, min_size: float, max_size: float) -> Tuple[int, int]:
        """detectron2's ``ResizeShortestEdge.get_output_shape``: ``(h, w)`` after resizing, each side rounded with
        ``int(x + 0.5)`` (torchvision floors ``side * scale``)."""
        size = float(min_size)
        scale = size / min(height, width)
        if height < width:
            newh, neww = size, scale * width
        else:
            newh, neww = scale * height, size
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh = newh * scale
            neww = neww * scale
        return int(newh + 0.5), int(neww + 0.5)

    # --- forward --------------------------------------------------------------------------------------------------
    def normalize(self, image: Tensor, value_range: float = 1.0) -> Tensor:
        """``(3, H, W)`` RGB image with values in ``[0, value_range]`` -> normalised network input (channel order
        ``pixel_order``, values scaled to ``[0, pixel_scale]``, then ``(x - mean) / std``)."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) RGB image tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"expected a float image in [0, 1], got dtype {image.dtype}")
        if self.pixel_order == "BGR":
            image = image.flip(0)
        if self.pixel_scale != value_range:
            image = image * (self.pixel_scale / value_range)
        mean = self.pixel_mean.to(image)
        std = self.pixel_std.to(image)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None, min_size: Optional[int] = None,
               max_size: Optional[int] = None) -> Tuple[Tensor, Optional[Dict[str, Tensor]], float]:
        h, w = image.shape[-2:]
        min_sizes, max_size = self._target_sizes(min_size, max_size)
        if self.training and len(min_sizes) > 1:
            size = min_sizes[int(torch.empty(1).uniform_(0.0, float(len(min_sizes))).item())]
        else:
            size = min_sizes[-1]
        scale = self.compute_scale(h, w, float(size), float(max_size))
        if self.resize_method == "detectron2":
            # `image` holds 0..255 values here (forward resizes before normalising, as detectron2 does).
            new_h, new_w = self.detectron2_output_shape(int(h), int(w), float(size), float(max_size))
            if (new_h, new_w) != (int(h), int(w)):
                image = pil_bilinear_resize(image, (new_h, new_w))
        elif scale != 1.0:
            if isinstance(h, int) and min(math.floor(h * scale), math.floor(w * scale)) < 1:
                # A side this thin (e.g. 3x2000 at 1333 max) would resize to 0 pixels, where torchvision fails:
                # it keeps 1 pixel (the other side as interpolate computes it).
                image = F.interpolate(image[None], size=(max(1, math.floor(h * scale)), max(1, math.floor(
                    w * scale))), mode="bilinear", align_corners=False)[0]
            else:
                image = F.interpolate(image[None], size=None, scale_factor=scale, mode="bilinear",
                                      recompute_scale_factor=True, align_corners=False)[0]
        if target is not None:
            target = dict(target)
            new_hw = tuple(image.shape[-2:])
            if "boxes" in target and new_hw != (h, w):
                target["boxes"] = resize_boxes(target["boxes"], (h, w), new_hw)
            if "keypoints" in target and new_hw != (h, w):
                target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), new_hw)
            if "masks" in target and new_hw != (h, w) and target["masks"].numel() > 0:
                m = target["masks"]
                target["masks"] = F.interpolate(m[:, None].float(), size=new_hw)[:, 0].to(m.dtype)
            elif "masks" in target and target["masks"].numel() == 0:
                target["masks"] = target["masks"].new_zeros((0,) + new_hw)
        return image, target, scale

    def batch(self, images: List[Tensor]) -> Tensor:
        max_h = max(int(im.shape[-2]) for im in images)
        max_w = max(int(im.shape[-1]) for im in images)
        d = self.size_divisibility
        if d > 1:  # 0 or 1: the largest image's size
            max_h = int(math.ceil(max_h / d) * d)
            max_w = int(math.ceil(max_w / d) * d)
        out = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
        for i, im in enumerate(images):
            out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        return out

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None, *,
                min_size: Optional[int] = None, max_size: Optional[int] = None
                ) -> Tuple[ImageList, Optional[List[Dict[str, Tensor]]]]:
        """Normalise, resize and batch ``images`` (list of ``(3, H, W)`` float RGB in [0, 1]) and scale ``targets``.

        The shorter side goes to ``min_size`` with the longer side capped at ``max_size`` when both are given (an
        explicit scale, e.g. the Detectron API's ``target_scale``); otherwise to a random training size in training
        mode and the test size in eval mode. Nothing is stored: the sizes apply to this call only.
        """
        if isinstance(images, Tensor):
            images = list(images) if images.dim() == 4 else [images]
        if len(images) == 0:
            raise ValueError("expected at least one image")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        out_images, out_targets, sizes, scales = [], [], [], []
        for i, image in enumerate(images):
            t = targets[i] if targets is not None else None
            if self.resize_method == "detectron2":
                # detectron2 resizes the 8-bit image, then normalises: round to 0..255 first (exact for images that
                # came from uint8), and normalise from that range without a lossy /255 * 255 round trip.
                if image.dim() != 3 or not image.is_floating_point():
                    self.normalize(image)  # raises the shape / dtype error
                image = (image * 255.0).round().clamp(0, 255)
                image, t, scale = self.resize(image, t, min_size, max_size)
                image = self.normalize(image, value_range=255.0)
            else:
                image = self.normalize(image)
                image, t, scale = self.resize(image, t, min_size, max_size)
            out_images.append(image)
            out_targets.append(t)
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            scales.append(scale)
        return ImageList(self.batch(out_images), sizes, scales), (out_targets if targets is not None else None)

    def postprocess(self, results: List[Dict[str, Tensor]], image_sizes: List[Tuple[int, int]],
                    original_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Boxes and ``keypoints`` from resized-image to original-image pixels; ``masks`` (N,1,M,M) pasted to
        (N,1,H,W)."""
        out = []
        for res, im_s, o_im_s in zip(results, image_sizes, original_sizes):
            res = dict(res)
            if self.detector_postprocess == "detectron2":
                res = _detectron2_postprocess(res, im_s, o_im_s)
            else:
                res["boxes"] = resize_boxes(res["boxes"], im_s, o_im_s)
            if "keypoints" in res:
                res["keypoints"] = resize_keypoints(res["keypoints"], im_s, o_im_s)
            if "masks" in res:
                res["masks"] = paste_masks_by_method(res["masks"], res["boxes"], tuple(o_im_s),
                                                     self.mask_paste_method, self.mask_paste_padding)
            out.append(res)
        return out


def _detectron2_postprocess(res: Dict[str, Tensor], image_size: Sequence[int], original_size: Sequence[int]
                            ) -> Dict[str, Tensor]:
    """detectron2's ``detector_postprocess`` on one image's detections (``boxes`` in ``image_size`` pixels): boxes
    scaled in place by Python-float factors (as ``Boxes.scale``), clipped to ``original_size`` and every entry of
    a box with a side ``<= 0`` dropped (``Boxes.nonempty``)."""
    scale_x = float(original_size[1]) / float(image_size[1])
    scale_y = float(original_size[0]) / float(image_size[0])
    boxes = res["boxes"].clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    h, w = int(original_size[0]), int(original_size[1])
    boxes = torch.stack((boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
                         boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)), dim=-1)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    n = boxes.shape[0]
    out = {k: (v[keep] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v) for k, v in res.items()}
    out["boxes"] = boxes[keep]
    return out
