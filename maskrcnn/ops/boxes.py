"""Elementary box operations.

Boxes are ``(..., 4)`` float tensors ``(x1, y1, x2, y2)`` in absolute pixels, torchvision's continuous
convention: width = ``x2 - x1``. Functions taking ``legacy_plus_one=True`` use Detectron's convention
instead, where coordinates index pixels inclusively and width = ``x2 - x1 + 1``.
"""

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from maskrcnn.ops._errors import OpArgumentError


def _check_boxes(boxes: Tensor, name: str, multiple_of_four: bool = False) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    last = boxes.shape[-1] if boxes.dim() > 0 else None
    ok = last is not None and (last % 4 == 0 and last > 0 if multiple_of_four else last == 4)
    if not ok:
        want = "a multiple of 4" if multiple_of_four else "4"
        raise OpArgumentError(f"{name} must have last dimension {want}, got shape {tuple(boxes.shape)}")


def _upcast(t: Tensor) -> Tensor:
    # Products of coordinates overflow fp16 (65504) for ordinary image sizes, and int8/int16 alike.
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor, legacy_plus_one: bool = False) -> Tensor:
    """Areas of ``boxes`` ``(..., 4)`` -> ``(...)``.

    fp16/bf16 boxes are computed and returned in float32 (as torchvision does) to avoid overflow.
    """
    _check_boxes(boxes, "boxes")
    boxes = _upcast(boxes)
    offset = 1 if legacy_plus_one else 0
    return (boxes[..., 2] - boxes[..., 0] + offset) * (boxes[..., 3] - boxes[..., 1] + offset)


def box_iou(boxes1: Tensor, boxes2: Tensor, legacy_plus_one: bool = False) -> Tensor:
    """Pairwise intersection-over-union of ``boxes1`` ``(N, 4)`` and ``boxes2`` ``(M, 4)`` -> ``(N, M)``.

    Leading batch dimensions broadcast: ``(..., N, 4)`` and ``(..., M, 4)`` give ``(..., N, M)``.
    Two zero-area boxes give ``nan`` (0 / 0), like torchvision.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    area1 = box_area(boxes1, legacy_plus_one)
    area2 = box_area(boxes2, legacy_plus_one)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    extent = _upcast(bottom_right - top_left)
    if legacy_plus_one:
        extent = extent + 1
    extent = extent.clamp(min=0)
    inter = extent[..., 0] * extent[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def clip_boxes_to_image(
    boxes: Tensor, size: Union[Tuple[int, int], Sequence[int], torch.Size], legacy_plus_one: bool = False
) -> Tensor:
    """Clip ``boxes`` ``(..., 4K)`` (``K`` boxes per row, e.g. per-class predictions) into an image.

    ``size`` is ``(height, width)`` (ints, or 0-dim tensors such as ``image.shape[-2:]`` under
    ``torch.jit.trace``, where they stay symbolic). x coordinates are clamped to ``[0, width]`` and y to
    ``[0, height]`` (``[0, width - 1]`` / ``[0, height - 1]`` with ``legacy_plus_one``). Returns a new
    tensor of the same shape and dtype; gradients flow through the coordinates strictly inside the bounds
    (none through one clamped or exactly on a bound, as with torchvision).
    """
    _check_boxes(boxes, "boxes", multiple_of_four=True)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {tuple(size)!r}")
    groups = boxes.shape[-1] // 4
    if any(isinstance(v, Tensor) for v in size):
        # Sizes read from a tensor's shape under torch.jit.trace are 0-dim tensors: float() would
        # freeze the example's size into the trace, stacking keeps them symbolic.
        height, width = (torch.as_tensor(v).to(dtype=boxes.dtype, device=boxes.device) for v in size)
        if legacy_plus_one:
            height, width = height - 1, width - 1
        limits = torch.stack((width, height, width, height)).repeat(groups)
    else:
        height, width = (float(v) for v in size)
        if legacy_plus_one:
            height, width = height - 1, width - 1
        limits = torch.tensor([width, height, width, height] * groups, dtype=boxes.dtype, device=boxes.device)
    # torch.where, not torch.minimum: a coordinate exactly on the bound gets no gradient, as with torchvision's
    # clamp (torch.minimum would split it in two); NaN fails the test and stays NaN, as it does there.
    clamped = boxes.clamp(min=0)
    return torch.where(clamped >= limits, limits, clamped)


def flip_boxes(boxes: Tensor, width: Union[int, float], legacy_plus_one: bool = False) -> Tensor:
    """Mirror ``boxes`` ``(..., 4K)`` (``K`` boxes per row) horizontally in an image ``width`` pixels wide.

    Pixel column ``i`` becomes ``width - 1 - i``, so ``x -> width - x`` in the continuous convention and
    ``x -> width - 1 - x`` with ``legacy_plus_one`` (Detectron's ``flip_boxes``); x1 and x2 swap roles so that
    ``x1 <= x2`` still holds. The flip is its own inverse (exactly for integer-valued coordinates).
    """
    _check_boxes(boxes, "boxes", multiple_of_four=True)
    right = float(width) - (1.0 if legacy_plus_one else 0.0)
    out = boxes.clone()
    out[..., 0::4] = right - boxes[..., 2::4]
    out[..., 2::4] = right - boxes[..., 0::4]
    return out


def remove_small_boxes(boxes: Tensor, min_size: float, legacy_plus_one: bool = False, strict: bool = False) -> Tensor:
    """Indices (int64, increasing) of the ``boxes`` ``(N, 4)`` whose width and height are both >= ``min_size``
    (torchvision's ``remove_small_boxes``), or with ``strict`` both > ``min_size`` (detectron2's
    ``Boxes.nonempty(threshold=min_size)``, which with 0 drops empty boxes)."""
    _check_boxes(boxes, "boxes")
    if boxes.dim() != 2:
        raise ValueError(f"boxes must be (N, 4), got shape {tuple(boxes.shape)}")
    offset = 1 if legacy_plus_one else 0
    widths = boxes[:, 2] - boxes[:, 0] + offset
    heights = boxes[:, 3] - boxes[:, 1] + offset
    if strict:
        return torch.nonzero((widths > min_size) & (heights > min_size)).flatten()
    return torch.nonzero((widths >= min_size) & (heights >= min_size)).flatten()


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(x1, y1, w, h)`` for ``(..., 4)`` boxes, w = x2 - x1."""
    _check_boxes(boxes, "boxes")
    return torch.cat((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(x1, y1, w, h)`` -> ``(x1, y1, x2, y2)`` for ``(..., 4)`` boxes, x2 = x1 + w."""
    _check_boxes(boxes, "boxes")
    return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), dim=-1)


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenate per-image boxes ``[(R_i, 4)]`` into RoIs ``(sum R_i, 5)``, column 0 the image index.

    The batch index is stored in the boxes' (promoted) dtype, as ``roi_align`` expects. An empty list
    gives a float32 ``(0, 5)`` tensor.
    """
    if isinstance(boxes, Tensor):
        raise TypeError("boxes must be a list of (R_i, 4) tensors, one per image, not a single tensor")
    if len(boxes) == 0:
        return torch.zeros((0, 5))
    for i, b in enumerate(boxes):
        _check_boxes(b, f"boxes[{i}]")
        if b.dim() != 2:
            raise ValueError(f"boxes[{i}] must be (R_i, 4), got shape {tuple(b.shape)}")
    dtype = torch.cat([b[:0] for b in boxes]).dtype  # the promoted dtype of all lists
    # new_full with each list's own length (not a tensor of Python counts) keeps the counts symbolic
    # under torch.jit.trace.
    return torch.cat(
        [torch.cat((b.new_full((b.shape[0], 1), i, dtype=dtype), b.to(dtype)), 1) for i, b in enumerate(boxes)]
    )
