"""Comparing an exported model's detections with the eager model's, detection by detection.

The measure the export tests and ``maskrcnn-export --check`` report: detections are matched in score order
(both lists are sorted by decreasing score; a swapped pair of near-equal scores is re-matched by box IoU), and
for the matched pairs the largest box coordinate difference (pixels), the largest score difference, and the
smallest IoU of the binarised (``> 0.5``) pasted masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from torch import Tensor

from ..ops.boxes import box_iou

__all__ = ["DetectionDiff", "compare_detections", "eager_detections"]


@dataclass
class DetectionDiff:
    """Differences between two detection lists (see the module docstring)."""

    num_ref: int
    num_out: int
    labels_equal: bool
    max_box_diff: float
    max_score_diff: float
    min_mask_iou: float

    def within(self, box_tol: float = 0.5, score_tol: float = 1e-3, mask_iou: float = 0.98) -> bool:
        """The issue's acceptance rule: same detections and labels, boxes within ``box_tol`` px, scores within
        ``score_tol``, every mask IoU >= ``mask_iou``."""
        return (self.num_ref == self.num_out and self.labels_equal and self.max_box_diff <= box_tol
                and self.max_score_diff <= score_tol and self.min_mask_iou >= mask_iou)

    def __str__(self) -> str:
        return (f"detections {self.num_out}/{self.num_ref}, labels equal {self.labels_equal}, max box diff "
                f"{self.max_box_diff:.2e} px, max score diff {self.max_score_diff:.2e}, min mask IoU "
                f"{self.min_mask_iou:.4f}")


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


def _match(ref_boxes: Tensor, out_boxes: Tensor) -> Tensor:
    """Index into ``out`` for each ``ref`` row: the same position, unless another unused detection among the
    neighbours (+-2, near-tied scores may swap) overlaps better."""
    n = min(ref_boxes.shape[0], out_boxes.shape[0])
    order = torch.arange(n)
    if n == 0:
        return order
    iou = box_iou(ref_boxes[:n].float(), out_boxes[:n].float())
    used = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        cand = [j for j in range(max(0, i - 2), min(n, i + 3)) if not used[j]]
        best = max(cand, key=lambda j: (float(iou[i, j]), j == i)) if cand else i
        order[i] = best
        used[best] = True
    return order


def compare_detections(ref: Dict[str, object], out: Dict[str, object], image_size=None,
                       mask_padding: int = 1, mask_paste_method: str = "torchvision") -> DetectionDiff:
    """Compare ``ref`` (eager: ``boxes, labels, scores, masks``) with ``out`` (exported); tensors or arrays.

    Masks may be pasted ``(N, 1, H, W)`` or ``(N, 1, M, M)`` probabilities; ``M x M`` ones are pasted into
    ``image_size`` = ``(H, W)`` with :func:`maskrcnn.export.paste.paste_masks` first (``mask_paste_method``,
    ``mask_padding``: the model's ``TEST.MASK_PASTE_METHOD`` and ``TEST.MASK_PASTE_PADDING``).
    """
    from .paste import paste_masks

    rb, ob = _t(ref["boxes"]).float(), _t(out["boxes"]).float()
    rs, os_ = _t(ref["scores"]).float(), _t(out["scores"]).float()
    rl, ol = _t(ref["labels"]).long(), _t(out["labels"]).long()
    n = min(rb.shape[0], ob.shape[0])
    idx = _match(rb, ob)
    labels_equal = rb.shape[0] == ob.shape[0] and bool(torch.equal(rl[:n], ol[idx]))
    box_diff = float((rb[:n] - ob[idx]).abs().max()) if n else 0.0
    score_diff = float((rs[:n] - os_[idx]).abs().max()) if n else 0.0
    min_iou = 1.0
    if "masks" in ref and "masks" in out and n:
        masks = []
        for m, b in ((ref["masks"], rb), (out["masks"], ob)):
            m = _t(m).float()
            if image_size is not None and tuple(m.shape[-2:]) != tuple(image_size):
                m = paste_masks(m, b, image_size, padding=mask_padding, method=mask_paste_method)
            masks.append(m.reshape(m.shape[0], -1) > 0.5)
        a, b = masks[0][:n], masks[1][idx]
        inter = (a & b).sum(1).float()
        union = (a | b).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        min_iou = float(iou.min())
    return DetectionDiff(int(rb.shape[0]), int(ob.shape[0]), labels_equal, box_diff, score_diff, min_iou)


@torch.no_grad()
def eager_detections(model: torch.nn.Module, image: Tensor) -> Dict[str, Tensor]:
    """The eager model's detections for one ``(3, H, W)`` uint8 or [0, 1] float RGB image (masks pasted)."""
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    was = model.training
    model.eval()
    try:
        return model([x])[0]
    finally:
        model.train(was)

