"""Turning RPN outputs into proposals: per-level top-k, decode, clip, drop small boxes, NMS, per-image top-N.

The arithmetic is that of torchvision's ``RegionProposalNetwork.filter_proposals`` (bit for bit with weights
``(1, 1, 1, 1)``): for each image the ``pre_nms_top_n`` best anchors of every level by objectness are decoded,
clipped to the image, boxes narrower or lower than ``min_size`` are dropped, then those scoring below
``score_thresh``, NMS runs within each level, and the ``post_nms_top_n`` best survivors are kept. For a
single-level (C4) RPN this is Detectron's ``GenerateProposalsOp``. With a legacy (``+1``) box coder, clipping,
the size filter and NMS use Detectron's inclusive widths too.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...ops.box_coder import BoxCoder
from ...ops.boxes import clip_boxes_to_image, remove_small_boxes
from ...ops.nms import batched_nms

__all__ = ["clip_boxes_to_size", "flatten_level_outputs", "generate_proposals", "GenerateProposals",
           "padded_batch_shape"]


def flatten_level_outputs(objectness: Sequence[Tensor], deltas: Sequence[Tensor]
                          ) -> Tuple[Tensor, Tensor, List[int]]:
    """Per level ``(N, A, H, W)`` logits and ``(N, 4A, H, W)`` deltas -> ``(N, T)`` and ``(N, T, 4)`` with
    ``T = sum H*W*A`` in anchor order (level, row, column, anchor), and the ``H*W*A`` of each level."""
    if isinstance(objectness, Tensor):
        objectness = [objectness]
    if isinstance(deltas, Tensor):
        deltas = [deltas]
    if len(objectness) != len(deltas) or len(objectness) == 0:
        raise ValueError(f"objectness and deltas must be non-empty lists with one entry per level, got "
                         f"{len(objectness)} and {len(deltas)}")
    scores, boxes, counts = [], [], []
    for i, (o, d) in enumerate(zip(objectness, deltas)):
        if i > 0 and o.dim() == 4 and o.shape[0] != scores[0].shape[0]:
            raise ValueError(f"level {i} has {o.shape[0]} images but level 0 has {scores[0].shape[0]}")
        s, b = _flatten_level(o, d, i)
        scores.append(s)
        boxes.append(b)
        counts.append(s.shape[1])
    return torch.cat(scores, 1), torch.cat(boxes, 1), counts


def generate_proposals(objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                       image_sizes: Union[Sequence[Tuple[int, int]], Tensor], pre_nms_top_n: int,
                       post_nms_top_n: int,
                       nms_thresh: float, min_size: float, box_coder: BoxCoder, score_thresh: float = 0.0,
                       scores_are_probs: bool = False, min_size_strict: bool = False, nms_on_logits: bool = False,
                       return_logits: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
    """Proposals of every image of a batch.

    Args:
        objectness: per level ``(N, A, H, W)`` logits (probabilities with ``scores_are_probs``).
        deltas: per level ``(N, 4A, H, W)``.
        anchors: per level ``(H*W*A, 4)`` xyxy anchors in padded-batch pixels, shared by all images.
        image_sizes: ``(h, w)`` of each image before padding; proposals are clipped to it. An ``(N, 2)`` int tensor
            of ``[h, w]`` rows is accepted too (a traced graph then clips to the traced input's size).
        pre_nms_top_n: anchors kept per level and image (by score) before decoding.
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: IoU above which NMS suppresses a box (within one level).
        min_size: boxes with width or height below this (input pixels) are dropped (torchvision uses 1e-3).
        box_coder: decodes the deltas (RPN weights ``(1, 1, 1, 1)``).
        score_thresh: proposals with probability below this are dropped.
        min_size_strict: keep sides ``> min_size`` (detectron2, drops empty boxes at 0) instead of ``>=``.
        nms_on_logits: NMS ranks by the logits (detectron2) instead of the probabilities (torchvision), which tie
            at 1.0 in float32 for logits above ~17; not with ``scores_are_probs``.
        return_logits: return the kept logits instead of probabilities (not with ``scores_are_probs``).

    Returns:
        ``boxes``: per image ``(P, 4)`` xyxy, float32 (or the deltas' wider dtype); ``scores``: per image ``(P,)``
        objectness probabilities (logits with ``return_logits``), decreasing. Nothing is differentiable: proposals are constants for the
        second stage, as in torchvision.
    """
    if int(pre_nms_top_n) <= 0 or int(post_nms_top_n) < 0:
        raise ValueError(f"pre_nms_top_n must be > 0 and post_nms_top_n >= 0, got {pre_nms_top_n} and "
                         f"{post_nms_top_n}")
    if not min_size >= 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if scores_are_probs and (nms_on_logits or return_logits):
        raise ValueError("nms_on_logits / return_logits need logits, but scores_are_probs=True says the objectness "
                         "inputs are probabilities")
    if isinstance(objectness, Tensor):
        objectness = [objectness]
    if isinstance(deltas, Tensor):
        deltas = [deltas]
    if isinstance(anchors, Tensor):
        anchors = [anchors]
    if len(objectness) != len(deltas) or len(objectness) == 0:
        raise ValueError(f"objectness and deltas must be non-empty lists with one entry per level, got "
                         f"{len(objectness)} and {len(deltas)}")
    if len(anchors) != len(objectness):
        raise ValueError(f"anchors must hold one (H*W*A, 4) tensor per level ({len(objectness)}), got {len(anchors)}")
    num_images = objectness[0].shape[0]
    if not isinstance(image_sizes, Tensor) and len(image_sizes) != num_images:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {num_images} images")
    device = objectness[0].device

    # Level by level (as torchvision): top-k of each level over all images at once, then only the selected
    # anchors are decoded. Every size here comes from tensor shapes, so a traced graph keeps them dynamic.
    top_scores, top_deltas, top_anchors, top_levels = [], [], [], []
    for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
        s, dl = _flatten_level(o.detach(), d.detach(), level)
        if a.dim() != 2 or a.shape[0] != s.shape[1] or a.shape[1] != 4:
            raise ValueError(f"anchors[{level}] must be (H*W*A, 4) = ({s.shape[1]}, 4), got {tuple(a.shape)}")
        idx = s.topk(_top_k(s, int(pre_nms_top_n)), dim=1).indices  # (N, k)
        top_scores.append(s.gather(1, idx))
        top_deltas.append(dl.gather(1, idx[:, :, None].expand(-1, -1, 4)))
        top_anchors.append(a.to(device)[idx])
        top_levels.append(torch.full_like(idx[0], level))
    scores = torch.cat(top_scores, 1).float()
    probs = scores if scores_are_probs else torch.sigmoid(scores)
    ranks = scores if nms_on_logits else probs
    outs = scores if return_logits else probs
    box_deltas = torch.cat(top_deltas, 1)
    levels = torch.cat(top_levels)
    # Decoding only the selected anchors: the same elementwise arithmetic torchvision applies to all of them.
    decoded = box_coder.decode(box_deltas.reshape(-1, 4), torch.cat(top_anchors, 1).reshape(-1, 4)).reshape(
        num_images, -1, 4)

    legacy = bool(getattr(box_coder, "legacy_plus_one", False))
    out_boxes, out_scores = [], []
    for i in range(num_images):
        boxes, s, r, o = decoded[i], probs[i], ranks[i], outs[i]
        boxes = clip_boxes_to_size(boxes, image_sizes[i], legacy)
        keep = remove_small_boxes(boxes, min_size, legacy_plus_one=legacy, strict=min_size_strict)
        # `>=` as torchvision: a threshold of 0 keeps every finite score but drops NaNs.
        keep = keep[s[keep] >= score_thresh]
        boxes, r, o, lv = boxes[keep], r[keep], o[keep], levels[keep]
        # Detectron's NMS counts inclusive pixels: moving the far corners out by one gives exactly its IoU.
        nms_boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) if legacy else boxes
        keep = _batched_nms(nms_boxes, r, lv, float(nms_thresh))[: int(post_nms_top_n)]
        out_boxes.append(boxes[keep])
        out_scores.append(o[keep])
    return out_boxes, out_scores


def _batched_nms(boxes: Tensor, scores: Tensor, levels: Tensor, iou_threshold: float) -> Tensor:
    """Per-level NMS. Under ``torch.export`` one ``torchvision::nms`` over boxes shifted apart by level (the
    dispatching :func:`~maskrcnn.ops.nms.batched_nms` branches on the number of boxes, which is data-dependent
    there)."""
    if torch.compiler.is_compiling():
        offsets = levels.to(boxes) * (boxes.max() + 1)
        return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, iou_threshold)
    return batched_nms(boxes, scores, levels, iou_threshold)


def _flatten_level(o: Tensor, d: Tensor, level: int) -> Tuple[Tensor, Tensor]:
    """``(N, A, H, W)`` logits and ``(N, 4A, H, W)`` deltas -> ``(N, H*W*A)`` and ``(N, H*W*A, 4)`` (anchor order)."""
    if o.dim() != 4 or d.dim() != 4:
        raise ValueError(f"level {level}: objectness and deltas must be 4-D, got shapes {tuple(o.shape)} and "
                         f"{tuple(d.shape)}")
    n, a, h, w = o.shape
    if tuple(d.shape) != (n, 4 * a, h, w):
        raise ValueError(f"level {level}: deltas must be (N, 4A, H, W) = {(n, 4 * a, h, w)} for objectness "
                         f"{tuple(o.shape)}, got {tuple(d.shape)}")
    return o.permute(0, 2, 3, 1).reshape(n, -1), d.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)


def _top_k(scores: Tensor, k: int):
    """``min(k, scores.shape[1])``; while tracing a 0-d tensor computed from the shape, so that the traced graph
    (TorchScript, ONNX) does not bake in the number of anchors of the image it was traced with; under
    ``torch.export`` a symbolic minimum (no guard on the image size)."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(scores)[1], max=k)
    if torch.compiler.is_compiling():
        return torch.sym_min(k, scores.shape[1])
    return min(k, int(scores.shape[1]))


def clip_boxes_to_size(boxes: Tensor, size, legacy_plus_one: bool = False) -> Tensor:
    """Clip ``(P, 4)`` boxes into an image of ``size`` = ``(h, w)`` ints or a ``(2,)`` tensor ``[h, w]``.

    A tensor size keeps the clip dynamic in a traced graph; ints give exactly
    :func:`~maskrcnn.ops.boxes.clip_boxes_to_image`."""
    if not isinstance(size, Tensor):
        return clip_boxes_to_image(boxes, (int(size[0]), int(size[1])), legacy_plus_one=legacy_plus_one)
    hw = size.to(device=boxes.device, dtype=boxes.dtype)
    if legacy_plus_one:
        hw = hw - 1
    limits = torch.stack((hw[1], hw[0], hw[1], hw[0]))
    return torch.minimum(boxes.clamp(min=0), limits)


def padded_batch_shape(image_sizes: Sequence[Tuple[int, int]], size_divisibility: int = 32) -> Tuple[int, int]:
    """``(H, W)`` of a batch holding ``image_sizes``, padded up to a multiple of ``size_divisibility``."""
    if len(image_sizes) == 0:
        raise ValueError("image_sizes is empty")
    d = max(int(size_divisibility), 1)
    h = max(int(s[0]) for s in image_sizes)
    w = max(int(s[1]) for s in image_sizes)
    return int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)


def _per_mode(value, name: str) -> Dict[str, float]:
    if isinstance(value, dict):
        missing = {"training", "testing"} - set(value)
        if missing:
            raise ValueError(f"{name} as a dict needs keys 'training' and 'testing', missing {sorted(missing)}")
        return {"training": value["training"], "testing": value["testing"]}
    return {"training": value, "testing": value}


class GenerateProposals(nn.Module):
    """Detectron.pytorch's ``RPN_GenerateProposals``: ``(cls_prob, bbox_pred, im_info) -> (rois, roi_probs)``.

    Args:
        anchor_generator: the RPN's :class:`~maskrcnn.modeling.rpn.anchors.AnchorGenerator` (shared).
        box_coder: the RPN's box coder (shared).
        pre_nms_top_n, post_nms_top_n, nms_thresh, min_size: a number, or ``{"training": .., "testing": ..}``;
            the pair used follows ``self.training``.
        size_divisibility: padding multiple of the network input, used to recover the padded batch size when the
            anchor strides are inferred from it.
        min_size_strict: keep proposal sides ``> min_size`` instead of ``>=`` (see :func:`generate_proposals`).
            NMS ranks the given probabilities (this entry point has no logits).

    ``forward(cls_prob, bbox_pred, im_info)``: ``cls_prob`` ``(N, A, H, W)`` sigmoid probabilities (or a list per
    level), ``bbox_pred`` ``(N, 4A, H, W)`` (or a list), ``im_info`` ``(N, 3)`` rows ``[height, width, scale]`` of
    the network input (the scale is informational: sizes are already in input pixels). Returns ``rois``
    ``(R, 5)`` float ``[batch_idx, x1, y1, x2, y2]`` (images in order, best first) and ``roi_probs`` ``(R,)``.
    """

    def __init__(self, anchor_generator: nn.Module, box_coder: BoxCoder, pre_nms_top_n, post_nms_top_n,
                 nms_thresh=0.7, min_size=0.0, size_divisibility: int = 32, min_size_strict: bool = False):
        super().__init__()
        self.min_size_strict = bool(min_size_strict)
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.pre_nms_top_n = _per_mode(pre_nms_top_n, "pre_nms_top_n")
        self.post_nms_top_n = _per_mode(post_nms_top_n, "post_nms_top_n")
        self.nms_thresh = _per_mode(nms_thresh, "nms_thresh")
        self.min_size = _per_mode(min_size, "min_size")
        self.size_divisibility = int(size_divisibility)

    def setting(self, name: str):
        """The current (train or test) value of ``pre_nms_top_n``, ``post_nms_top_n``, ``nms_thresh``, ``min_size``."""
        return getattr(self, name)["training" if self.training else "testing"]

    def forward(self, cls_prob: Union[Tensor, Sequence[Tensor]], bbox_pred: Union[Tensor, Sequence[Tensor]],
                im_info, batch_shape=None) -> Tuple[Tensor, Tensor]:
        probs = [cls_prob] if isinstance(cls_prob, Tensor) else list(cls_prob)
        deltas = [bbox_pred] if isinstance(bbox_pred, Tensor) else list(bbox_pred)
        info = torch.as_tensor(im_info, dtype=torch.float64).cpu()
        if info.dim() != 2 or info.shape[1] != 3 or info.shape[0] != probs[0].shape[0]:
            raise ValueError(f"im_info must be (N, 3) [height, width, scale] with N = {probs[0].shape[0]} images, "
                             f"got shape {tuple(info.shape)}")
        sizes = [(int(round(float(r[0]))), int(round(float(r[1])))) for r in info]
        if batch_shape is None and getattr(self.anchor_generator, "strides", None) is None:
            batch_shape = padded_batch_shape(sizes, self.size_divisibility)
        anchors = self.anchor_generator(probs, batch_shape)
        boxes, scores = generate_proposals(probs, deltas, anchors, sizes, self.setting("pre_nms_top_n"),
                                           self.setting("post_nms_top_n"), self.setting("nms_thresh"),
                                           self.setting("min_size"), self.box_coder, scores_are_probs=True,
                                           min_size_strict=self.min_size_strict)
        batch_idx = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype, device=b.device)
                               for i, b in enumerate(boxes)])
        return torch.cat([batch_idx, torch.cat(boxes)], 1), torch.cat(scores)

    def extra_repr(self) -> str:
        return (f"pre_nms_top_n={self.pre_nms_top_n}, post_nms_top_n={self.post_nms_top_n}, "
                f"nms_thresh={self.nms_thresh}, min_size={self.min_size}")
