"""detectron2's way of pasting ``M x M`` mask probabilities into the image: ``grid_sample`` at pixel centres.

torchvision (and Detectron) pad the mask by one pixel, expand its box accordingly, truncate the box to integers and
resize the padded mask to that integer box (:func:`~maskrcnn.ops.masks.paste_masks_in_image`). detectron2's
``layers/mask_ops.paste_masks_in_image`` keeps the float box: image pixel ``(x, y)`` (centre ``x + 0.5``) samples the
mask at normalised coordinate ``(x + 0.5 - x0) / (x1 - x0) * 2 - 1`` with ``F.grid_sample(align_corners=False)``
(bilinear, zeros outside), then thresholds at ``>= 0.5``. On the CPU it pastes one mask at a time and samples only
the pixels from ``floor(x0) - 1`` to ``ceil(x1) + 1`` (clipped to the image), zero elsewhere; this module does the
same, so that the probabilities, not only the binary masks, are detectron2's. (On a GPU detectron2 samples the
whole image; the extra pixels lie more than one pixel outside the box, where the probability is below half the
mask's edge value, so its binary masks are the same.)
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks_grid_sample"]


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, image_shape: Tuple[int, int]) -> Tensor:
    """Paste ``masks`` into ``(h, w)`` images at ``boxes`` as detectron2 does on the CPU.

    Args:
        masks: ``(N, 1, M, M)`` or ``(N, M, M)`` floating-point mask probabilities.
        boxes: ``(N, 4)`` float ``x1, y1, x2, y2`` boxes in the output image's pixels (continuous convention).
        image_shape: ``(h, w)`` of the output.

    Returns:
        ``(N, 1, h, w)`` probabilities in ``masks``' dtype (detectron2's binary mask is ``>= 0.5`` of it), zero
        outside each box's sampled window, and all zero for a box of zero width or height.
    """
    fn = "paste_masks_grid_sample"
    if not isinstance(masks, Tensor) or masks.dim() not in (3, 4) or (masks.dim() == 4 and masks.shape[1] != 1):
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"{fn}: masks must be (N, 1, M, M) or (N, M, M), got {shape}")
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.shape[-1] != masks.shape[-2] or masks.shape[-1] == 0:
        raise ValueError(f"{fn}: masks must be square and non-empty, got {tuple(masks.shape[-2:])}")
    if not masks.is_floating_point():
        raise TypeError(f"{fn}: masks must be floating point (probabilities), got {masks.dtype}")
    if not isinstance(boxes, Tensor) or boxes.shape != (masks.shape[0], 4):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{fn}: boxes must be ({masks.shape[0]}, 4) (one per mask), got {shape}")
    img_h, img_w = int(image_shape[0]), int(image_shape[1])
    if img_h < 0 or img_w < 0:
        raise ValueError(f"{fn}: image_shape must be non-negative, got {tuple(image_shape)}")
    out = masks.new_zeros((masks.shape[0], 1, img_h, img_w))
    if masks.shape[0] == 0 or img_h == 0 or img_w == 0:
        return out
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    for i in range(masks.shape[0]):
        box = boxes[i : i + 1]
        # The sampled window: detectron2's skip_empty bounds for a chunk of one mask.
        x0_int, y0_int = (int(v) for v in torch.clamp(box.min(dim=0).values.floor()[:2] - 1, min=0))
        x1_int = int(torch.clamp(box[:, 2].max().ceil() + 1, max=img_w))
        y1_int = int(torch.clamp(box[:, 3].max().ceil() + 1, max=img_h))
        if x1_int <= x0_int or y1_int <= y0_int or bool((box[0, 2] == box[0, 0]) | (box[0, 3] == box[0, 1])):
            continue  # outside the image, or of zero extent (which would sample at NaN: nothing to paste)
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        pasted = F.grid_sample(masks[i : i + 1], grid.to(masks.dtype), align_corners=False)
        out[i, 0, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0]
    return out
