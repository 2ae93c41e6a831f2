"""Turning RPN outputs into proposals: per-level top-k, decode, clip, drop small boxes, NMS, per-image top-N.

The arithmetic follows torchvision's ``RegionProposalNetwork.filter_proposals`` (which Detectron's FPN collection
also amounts to per image): the top ``pre_nms_top_n`` anchors of each level by objectness, decoded with weights
(1, 1, 1, 1), clipped, boxes narrower than ``min_size`` dropped, NMS within each level, and the best
``post_nms_top_n`` of the image kept.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.boxes import clip_boxes_to_image, remove_small_boxes
from ...ops.nms import batched_nms

__all__ = ["generate_proposals", "flatten_level_outputs", "GenerateProposals"]


def flatten_level_outputs(objectness: Sequence[Tensor], deltas: Sequence[Tensor]) -> Tuple[Tensor, Tensor, List[int]]:
    """``(N, A, H, W)`` / ``(N, 4A, H, W)`` per level → ``(N, sum HWA)``, ``(N, sum HWA, 4)`` in anchor order
    (row, column, anchor), and the number of anchors per level."""
    scores, boxes, counts = [], [], []
    for o, d in zip(objectness, deltas):
        n, a, h, w = o.shape
        scores.append(o.permute(0, 2, 3, 1).reshape(n, -1))
        boxes.append(d.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        counts.append(h * w * a)
    return torch.cat(scores, 1), torch.cat(boxes, 1), counts


def generate_proposals(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                       image_sizes: Sequence[Tuple[int, int]], pre_nms_top_n: int, post_nms_top_n: int,
                       nms_thresh: float, min_size: float, box_coder: BoxCoder, score_thresh: float = 0.0,
                       scores_are_probs: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
    """Proposals per image.

    Args:
        objectness: per level ``(N, A, H, W)`` logits (or probabilities with ``scores_are_probs``).
        deltas: per level ``(N, 4A, H, W)``.
        anchors: per level ``(H*W*A, 4)`` xyxy in padded-batch pixels (shared by all images).
        image_sizes: ``(h, w)`` of each image before padding (proposals are clipped to it).
        pre_nms_top_n: anchors kept per level (by score) before decoding and NMS.
        post_nms_top_n: proposals kept per image after NMS.

    Returns:
        ``boxes``: per image ``(P, 4)`` float32 xyxy; ``scores``: per image ``(P,)`` objectness probabilities,
        sorted by decreasing score. Both are detached from the graph.
    """
    scores, box_deltas, counts = flatten_level_outputs([o.detach() for o in objectness],
                                                       [d.detach() for d in deltas])
    scores = scores.float()
    num_images = scores.shape[0]
    all_anchors = torch.cat(list(anchors), 0)
    # Per-level top-k, without a Python loop over images.
    idx, lvl = [], []
    offset = 0
    for level, n in enumerate(counts):
        k = min(int(pre_nms_top_n), n)
        top = scores[:, offset:offset + n].topk(k, dim=1).indices + offset
        idx.append(top)
        lvl.append(torch.full((k,), level, dtype=torch.int64, device=scores.device))
        offset += n
    idx = torch.cat(idx, 1)
    levels = torch.cat(lvl)
    batch = torch.arange(num_images, device=scores.device)[:, None]
    top_scores = scores[batch, idx]
    top_deltas = box_deltas[batch, idx].float()
    top_anchors = all_anchors[idx.reshape(-1)]
    decoded = box_coder.decode(top_deltas.reshape(-1, 4), top_anchors).reshape(num_images, -1, 4)
    probs = top_scores if scores_are_probs else torch.sigmoid(top_scores)
    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    out_boxes, out_scores = [], []
    for boxes, s, size in zip(decoded, probs, image_sizes):
        boxes = clip_boxes_to_image(boxes, (int(size[0]), int(size[1])), legacy_plus_one=legacy)
        keep = remove_small_boxes(boxes, min_size, legacy_plus_one=legacy)
        boxes, s, lv = boxes[keep], s[keep], levels[keep]
        if score_thresh > 0:
            keep = torch.where(s >= score_thresh)[0]
            boxes, s, lv = boxes[keep], s[keep], lv[keep]
        keep = batched_nms(boxes, s, lv, nms_thresh)[: int(post_nms_top_n)]
        out_boxes.append(boxes[keep])
        out_scores.append(s[keep])
    return out_boxes, out_scores


class GenerateProposals(nn.Module):
    """Detectron.pytorch's ``RPN_GenerateProposals``: ``(cls_prob, bbox_pred, im_info) -> (rois, roi_probs)``.

    ``cls_prob``: ``(N, A, H, W)`` sigmoid objectness (or a list per level); ``bbox_pred``: ``(N, 4A, H, W)`` (or a
    list); ``im_info``: ``(N, 3)`` rows ``[height, width, scale]`` of the network input. Returns ``rois`` ``(R, 5)``
    ``[batch_idx, x1, y1, x2, y2]`` and ``roi_probs`` ``(R,)``. Uses the train or test top-N by ``self.training``.
    """

    def __init__(self, anchor_generator: nn.Module, box_coder: BoxCoder, pre_nms_top_n: dict,
                 post_nms_top_n: dict, nms_thresh: dict, min_size: dict):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.pre_nms_top_n, self.post_nms_top_n = dict(pre_nms_top_n), dict(post_nms_top_n)
        self.nms_thresh, self.min_size = dict(nms_thresh), dict(min_size)

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def forward(self, cls_prob: Union[Tensor, Sequence[Tensor]], bbox_pred: Union[Tensor, Sequence[Tensor]],
                im_info: Tensor, batch_shape: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
        probs = [cls_prob] if isinstance(cls_prob, Tensor) else list(cls_prob)
        deltas = [bbox_pred] if isinstance(bbox_pred, Tensor) else list(bbox_pred)
        im_info = torch.as_tensor(im_info)
        sizes = [(int(round(float(r[0]))), int(round(float(r[1])))) for r in im_info.reshape(-1, 3)]
        if batch_shape is None and getattr(self.anchor_generator, "strides", None) is None:
            # Inferred strides need the padded batch size; inputs are padded to a multiple of 32.
            batch_shape = (int(math.ceil(max(h for h, _ in sizes) / 32.0) * 32),
                           int(math.ceil(max(w for _, w in sizes) / 32.0) * 32))
        anchors = self.anchor_generator(probs, batch_shape)
        mode = self._mode()
        boxes, scores = generate_proposals(probs, deltas, anchors, sizes, self.pre_nms_top_n[mode],
                                           self.post_nms_top_n[mode], self.nms_thresh[mode], self.min_size[mode],
                                           self.box_coder, scores_are_probs=True)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)], 0)
        return rois, torch.cat(scores, 0)
