"""Box regression parameterisation of R-CNN (dx, dy, dw, dh), as in Detectron and torchvision.

For a reference box (anchor/proposal) with center ``(cx, cy)`` and size ``(w, h)`` and a target box
``(cx', cy', w', h')``, the weighted deltas are::

    dx = wx * (cx' - cx) / w      dy = wy * (cy' - cy) / h
    dw = ww * log(w' / w)         dh = wh * log(h' / h)

Boxes are ``(x1, y1, x2, y2)``. By default widths follow torchvision's continuous convention
(``w = x2 - x1``) and the results match ``torchvision.models.detection._utils.BoxCoder`` bit for bit.
With ``legacy_plus_one=True`` they follow Detectron (``w = x2 - x1 + 1``; a decoded box ends at
``center + w / 2 - 1``), which is what weights trained by Detectron expect.
"""

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision deltas (autocast heads) are decoded in float32: exp() and the center arithmetic
    # on pixel coordinates lose whole pixels in fp16/bf16.
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


class BoxCoder:
    """Encode boxes as deltas relative to reference boxes and decode deltas back to boxes.

    Args:
        weights: ``(wx, wy, ww, wh)`` multiplying the deltas (e.g. ``(10, 10, 5, 5)`` for the box
            head, ``(1, 1, 1, 1)`` for the RPN).
        bbox_xform_clip: upper bound applied to ``dw`` and ``dh`` (after dividing by the weights)
            before ``exp`` when decoding, so a wild prediction cannot overflow.
        legacy_plus_one: use Detectron's ``+1`` width convention.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
        legacy_plus_one: bool = False,
    ) -> None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 elements (wx, wy, ww, wh), got {weights!r}")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"weights must be positive and finite, got {weights!r}")
        self.weights: Tuple[float, float, float, float] = weights  # type: ignore[assignment]
        self.bbox_xform_clip = float(bbox_xform_clip)
        self.legacy_plus_one = bool(legacy_plus_one)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip}, "
            f"legacy_plus_one={self.legacy_plus_one})"
        )

    def _centers_and_sizes(self, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        if self.legacy_plus_one:
            widths = widths + 1.0
            heights = heights + 1.0
        return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights

    def encode(self, gt_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas ``(N, 4)`` that turn ``proposals`` ``(N, 4)`` into ``gt_boxes`` ``(N, 4)``.

        Computed in the promoted floating dtype of the inputs (at least float32). Degenerate
        (zero-width) proposals give non-finite deltas; callers encode only sampled foreground.
        """
        for name, t in (("gt_boxes", gt_boxes), ("proposals", proposals)):
            if t.dim() != 2 or t.shape[1] != 4:
                raise ValueError(f"{name} must be (N, 4), got shape {tuple(t.shape)}")
        if gt_boxes.shape[0] != proposals.shape[0]:
            raise ValueError(
                f"gt_boxes and proposals must pair up row by row, got {gt_boxes.shape[0]} and {proposals.shape[0]} rows"
            )
        dtype = _compute_dtype(gt_boxes, proposals)
        gt_boxes, proposals = gt_boxes.to(dtype), proposals.to(dtype)
        ex_ctr_x, ex_ctr_y, ex_w, ex_h = self._centers_and_sizes(proposals)
        gt_ctr_x, gt_ctr_y, gt_w, gt_h = self._centers_and_sizes(gt_boxes)
        wx, wy, ww, wh = self.weights
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_w
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_h
        dw = ww * torch.log(gt_w / ex_w)
        dh = wh * torch.log(gt_h / ex_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` ``(N, 4K)`` (``K`` predictions per box, e.g. one per class) to ``boxes`` ``(N, 4)``.

        Returns ``(N, 4K)`` boxes in the dtype of ``deltas`` upcast to at least float32 (fp16/bf16
        deltas are decoded in float32). ``boxes`` are converted to that dtype first, as torchvision
        does. No clipping to the image is done here.
        """
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[1] == 0:
            raise ValueError(f"deltas must be (N, 4K) with K >= 1, got shape {tuple(deltas.shape)}")
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4), got shape {tuple(boxes.shape)}")
        if deltas.shape[0] != boxes.shape[0]:
            raise ValueError(f"deltas has {deltas.shape[0]} rows but boxes has {boxes.shape[0]}")
        dtype = _compute_dtype(deltas)
        deltas = deltas.to(dtype)
        boxes = boxes.to(dtype)
        ctr_x, ctr_y, widths, heights = self._centers_and_sizes(boxes)

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])

        x1 = pred_ctr_x - half_w
        y1 = pred_ctr_y - half_h
        x2 = pred_ctr_x + half_w
        y2 = pred_ctr_y + half_h
        if self.legacy_plus_one:
            # Inclusive pixel coordinates: the last pixel of a width-w box starting at x1 is x1 + w - 1.
            x2 = x2 - 1.0
            y2 = y2 - 1.0
        # (N, K, 4) interleaved back to (N, 4K): x1, y1, x2, y2 of prediction k at columns 4k..4k+3.
        return torch.stack((x1, y1, x2, y2), dim=2).reshape(deltas.shape)
