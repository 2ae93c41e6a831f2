"""Greedy non-maximum suppression.

``nms`` and ``batched_nms`` dispatch through :func:`maskrcnn.ops._backend.resolve` ("nms") to
torchvision's compiled kernel or to the pure-PyTorch implementation here, which returns exactly the
indices torchvision's CPU kernel returns:

* boxes are visited in order of decreasing score, equal scores in increasing index order (a stable
  descending sort);
* IoU is ``inter / (area_i + area_j - inter)`` with ``area = (x2 - x1) * (y2 - y1)`` (no ``+1``),
  evaluated in the boxes' dtype with the same operation order, so it rounds identically;
* a box is suppressed when its IoU with an already kept box is strictly greater than
  ``iou_threshold`` (compared as a double, as the C++ kernel does).

Native algorithm. Boxes are sorted once, then consumed in blocks of ``_BLOCK`` from the front of the
list of still-unsuppressed boxes. Inside a block, the block-by-block IoU test is one vectorised tile
and the greedy decisions are a sequential pass over its rows packed as Python-int bitsets (cheap and
independent of how long suppression chains are). The kept boxes of the block then suppress all later
boxes at once (IoU tiles, ``any`` over rows), and the suppressed ones are dropped from the list, so,
like the C++ loop, work is spent only on (kept, still alive) pairs, but in large vectorised steps.
``batched_nms`` sorts class-major, so a block only has to be compared with the rest of its last
class, and no coordinate offset is needed: IoUs are computed on the original coordinates, exactly as
per-class NMS does (offsets of thousands of pixels would round float32 coordinates).

Measured on one CPU thread against ``torchvision.ops.nms`` (random boxes, xy in [0, 800], wh in
[10, 200], IoU 0.7 / 0.5): about 0.6-0.9x its time at 1k boxes, 0.3x at 5k, 0.25x at 12k. Small
inputs (< ~300 boxes) are dominated by a fixed ~0.2 ms of dispatch overhead.
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from maskrcnn.ops import _backend
from maskrcnn.ops._errors import OpArgumentError

# Rows per block: larger blocks mean fewer Python-level steps but more wasted in-block IoUs among
# boxes that end up suppressed; 256 measured best on CPU between 128 and 1024.
_BLOCK = 256
# Elements per IoU tile. The ~14 elementwise passes per tile cost a fixed dispatch overhead each, so
# tiles must be large; past 2**18 (3 MiB of float buffers) nothing more is gained on CPU.
_TILE = 1 << 18


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _check_inputs(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor] = None) -> None:
    # A 1-D empty tensor is accepted as "no boxes", as torchvision and detectron2 accept it.
    empty_1d = isinstance(boxes, Tensor) and boxes.dim() == 1 and boxes.shape[0] == 0
    if not isinstance(boxes, Tensor) or not (empty_1d or (boxes.dim() == 2 and boxes.shape[1] == 4)):
        raise OpArgumentError(f"boxes must be a (N, 4) tensor (or an empty (0,) one), got {_describe(boxes)}")
    n = boxes.shape[0]
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != n:
        raise OpArgumentError(f"scores must be a (N,) tensor with N = {n} (boxes), got {_describe(scores)}")
    if idxs is not None:
        if not isinstance(idxs, Tensor) or idxs.dim() != 1 or idxs.shape[0] != n:
            raise OpArgumentError(f"idxs must be a (N,) tensor with N = {n} (boxes), got {_describe(idxs)}")
        if idxs.is_floating_point() or idxs.is_complex():
            raise OpArgumentError(f"idxs must have an integer (or bool) dtype, got {idxs.dtype}")


def _dequantized(boxes: Tensor, scores: Tensor) -> Tuple[Tensor, Tensor]:
    """Quantized boxes and scores as floats. torchvision sends quantized input to its ``qnms`` kernel, whose IoUs on
    the integer values equal those on the dequantized ones (the zero point cancels in the differences, the scale in
    the ratio); its tests assert that equality."""
    if isinstance(boxes, Tensor) and boxes.is_quantized:
        boxes = boxes.dequantize()
    if isinstance(scores, Tensor) and scores.is_quantized:
        scores = scores.dequantize()
    return boxes, scores


def _work_dtype(boxes: Tensor, scores: Tensor) -> torch.dtype:
    # torchvision's CPU kernel needs equal box/score dtypes and rejects fp16/bf16; promoting both
    # (losslessly for scores) keeps the two backends on the same arithmetic.
    dtype = torch.promote_types(boxes.dtype, scores.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def _smallest_float32_above(value: float) -> float:
    limit = float(np.finfo(np.float32).max)
    if value >= limit:
        return math.inf
    if value < -limit:
        return -limit
    candidate = np.float32(value)
    if float(candidate) <= value:
        candidate = np.nextafter(candidate, np.float32(np.inf), dtype=np.float32)
    return float(candidate)


class _Suppressor:
    """IoU-above-threshold tests between sorted boxes, with reusable tile buffers."""

    def __init__(self, dtype: torch.dtype, device: torch.device, iou_threshold: float, num_boxes: int) -> None:
        threshold = float(iou_threshold)
        if dtype == torch.float32 and math.isfinite(threshold):
            # The C++ kernel compares the float32 IoU with the double threshold, while torch would
            # round the threshold to float32 first. `>=` the smallest float32 strictly above the
            # threshold is the kernel's test in float32 arithmetic.
            self.threshold, self.inclusive = _smallest_float32_above(threshold), True
        else:
            self.threshold, self.inclusive = threshold, False
        size = min(_TILE, max(_BLOCK, num_boxes) * num_boxes)
        self.buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(3)]
        self.mask = torch.empty(size, dtype=torch.bool, device=device)

    def above(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Bool ``(R, C)``: IoU(row r, col c) > threshold. ``rows``/``cols`` are ``(5, R)``/``(5, C)``
        (x1, y1, x2, y2, area); ``R * C`` must not exceed ``_TILE``."""
        r, c = rows.shape[1], cols.shape[1]
        a, b, t = (buf[: r * c].view(r, c) for buf in self.buffers)
        torch.maximum(rows[0, :, None], cols[0, None, :], out=a)
        torch.minimum(rows[2, :, None], cols[2, None, :], out=b)
        torch.sub(b, a, out=b).clamp_(min=0)  # intersection width
        torch.maximum(rows[1, :, None], cols[1, None, :], out=a)
        torch.minimum(rows[3, :, None], cols[3, None, :], out=t)
        torch.sub(t, a, out=t).clamp_(min=0)  # intersection height
        torch.mul(b, t, out=b)  # intersection
        torch.add(rows[4, :, None], cols[4, None, :], out=a)
        torch.sub(a, b, out=a)  # union, as (area_i + area_j) - inter
        torch.div(b, a, out=b)
        out = self.mask[: r * c].view(r, c)
        if self.inclusive:
            return torch.ge(b, self.threshold, out=out)
        return torch.gt(b, self.threshold, out=out)

    def any_over_rows(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Bool ``(C,)``: column c is above threshold with at least one row; tiled to fit the buffers."""
        r, c = rows.shape[1], cols.shape[1]
        hit = torch.zeros(c, dtype=torch.bool, device=cols.device)
        # Whole row sets per tile: the `any` then finishes each column in a single pass.
        row_step = min(r, _TILE)
        col_step = max(1, _TILE // row_step)
        for r0 in range(0, r, row_step):
            sub_rows = rows[:, r0 : r0 + row_step]
            for c0 in range(0, c, col_step):
                tile = self.above(sub_rows, cols[:, c0 : c0 + col_step])
                hit[c0 : c0 + col_step] |= tile.any(dim=0)
        return hit


def _resolve_block(strict_upper: Tensor) -> Tensor:
    """Greedy decisions inside a block whose boxes are all still alive.

    ``strict_upper[i, j]`` (only ``i < j`` set) says box ``i`` would suppress box ``j``. Returns the
    int64 positions of the kept boxes, increasing. The sequential pass runs on Python-int bitsets
    (one row = one int), ~50 us for 256 rows whatever the suppression chains look like.
    """
    n = strict_upper.shape[0]
    device = strict_upper.device
    if not bool(strict_upper.any()):
        return torch.arange(n, device=device)
    packed = np.packbits(strict_upper.cpu().numpy(), axis=1, bitorder="little")
    removed = 0
    kept: List[int] = []
    for i, row in enumerate(packed):
        if not (removed >> i) & 1:
            kept.append(i)
            removed |= int.from_bytes(row.tobytes(), "little")
    return torch.tensor(kept, dtype=torch.int64, device=device)


def _nms_native_sorted(data: Tensor, labels: Optional[Tensor], suppressor: _Suppressor) -> Tensor:
    """Greedy NMS over boxes already in visiting order. ``data`` is ``(5, N)`` (x1, y1, x2, y2, area);
    ``labels`` (N,) sorted ascending or None; N >= 1. Returns the kept positions, increasing."""
    position = torch.arange(data.shape[1], device=data.device)
    kept: List[Tensor] = []
    while position.numel() > 0:
        m = position.numel()
        b = min(_BLOCK, m)
        block = data[:, :b]
        row_step = max(1, _TILE // b)
        if row_step >= b:
            within = suppressor.above(block, block).clone()
        else:
            within = torch.cat([suppressor.above(block[:, r : r + row_step], block) for r in range(0, b, row_step)])
        within.triu_(diagonal=1)
        if labels is not None and bool(labels[0] != labels[b - 1]):
            within &= labels[:b, None] == labels[None, :b]
        keep = _resolve_block(within)
        kept.append(position[keep])
        if b == m:
            break

        end = m
        rows = keep
        if labels is not None:
            # Sorted class-major: later boxes of other classes lie past the block's last class.
            last = labels[b - 1]
            end = int(torch.searchsorted(labels, last, right=True))
            rows = keep[labels[keep] == last]
        if end > b and rows.numel() > 0:
            hit = suppressor.any_over_rows(block.index_select(1, rows), data[:, b:end])
            alive = torch.nonzero(~hit).flatten() + b
            if end < m:
                alive = torch.cat((alive, torch.arange(end, m, device=data.device)))
            position = position[alive]
            data = data.index_select(1, alive)
            if labels is not None:
                labels = labels[alive]
        else:
            position, data = position[b:], data[:, b:]
            if labels is not None:
                labels = labels[b:]
    return torch.cat(kept)


def _prepare(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tuple[Tensor, Tensor, _Suppressor]:
    dtype = _work_dtype(boxes, scores)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    return boxes, scores, _Suppressor(dtype, boxes.device, iou_threshold, boxes.shape[0])


def _columns(sorted_boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = sorted_boxes.unbind(dim=1)
    return torch.stack((x1, y1, x2, y2, (x2 - x1) * (y2 - y1)))


def nms_native(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Pure-PyTorch :func:`nms` (any device); identical output to torchvision's CPU kernel."""
    _check_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes, scores, suppressor = _prepare(boxes, scores, iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[_nms_native_sorted(_columns(boxes[order]), None, suppressor)]


def batched_nms_native(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Pure-PyTorch :func:`batched_nms`: NMS within each value of ``idxs``, on original coordinates."""
    _check_inputs(boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes, scores, suppressor = _prepare(boxes, scores, iou_threshold)
    labels = idxs.to(torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]  # class-major, score order within
    keep = order[_nms_native_sorted(_columns(boxes[order]), labels[order], suppressor)]
    # Merge the classes back into one list by decreasing score, ties by index (as torchvision's nms).
    keep = torch.sort(keep).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _empty_keep(boxes: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=boxes.device)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: int64 indices of the kept ``boxes`` ``(N, 4)`` (x1, y1, x2, y2), by decreasing ``scores`` ``(N,)``.

    A box is dropped when its IoU with a higher-scoring kept box is ``> iou_threshold``. Equal scores
    are visited in increasing index order. Uses torchvision's kernel or the native implementation
    according to :func:`maskrcnn.ops._backend.resolve`; both give the same indices on CPU. Empty
    input (``(0, 4)`` or ``(0,)`` boxes) gives an empty int64 tensor. Quantized boxes and scores are dequantized
    (the indices of torchvision's ``qnms``). Under ``torch.jit.trace`` the call is recorded as one op
    (``torchvision::nms`` or ``maskrcnn::nms``), valid for any N.
    """
    boxes, scores = _dequantized(boxes, scores)
    _check_inputs(boxes, scores)
    tracing = torch.jit.is_tracing()
    if not tracing and boxes.shape[0] == 0:
        return _empty_keep(boxes)
    if tracing:
        boxes = boxes.reshape(-1, 4)
    if _backend.resolve("nms") == "torchvision":
        dtype = _work_dtype(boxes, scores)
        return torch.ops.torchvision.nms(boxes.to(dtype), scores.to(dtype), float(iou_threshold))
    if tracing:
        return torch.ops.maskrcnn.nms(boxes, scores, float(iou_threshold))
    return nms_native(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently to each category ``idxs`` ``(N,)`` (any integer dtype).

    Returns int64 indices of the kept boxes by decreasing score (empty int64 for ``(0, 4)`` or
    ``(0,)`` boxes). The torchvision backend calls ``torchvision.ops.batched_nms``, whose
    coordinate-offset path (CPU, <= 1000 boxes) computes IoUs on shifted, hence float32-rounded,
    coordinates and may flip decisions within ~1e-4 of the threshold. The native backend computes
    IoUs on the original coordinates, so it equals per-class :func:`nms` exactly, and orders equal
    scores by increasing index.

    Under ``torch.jit.trace`` the native backend is recorded as one op (``maskrcnn::batched_nms``);
    the torchvision one as torchvision's offset trick (what ``torchvision.ops.batched_nms`` itself
    traces to), written so that the trace also accepts zero boxes.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0 and not torch.jit.is_tracing():
        return _empty_keep(boxes)  # whatever the other arguments, as torchvision's batched_nms
    boxes, scores = _dequantized(boxes, scores)
    _check_inputs(boxes, scores, idxs)
    tracing = torch.jit.is_tracing()
    if not tracing and boxes.shape[0] == 0:
        return _empty_keep(boxes)
    if tracing:
        boxes = boxes.reshape(-1, 4)
    if _backend.resolve("nms") == "torchvision":
        dtype = _work_dtype(boxes, scores)
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        if tracing:
            # torchvision's `if boxes.numel() == 0` would be frozen into the trace and `boxes.max()`
            # fails on zero boxes; a 0 sentinel leaves the maximum unchanged for the non-negative coordinates
            # the offset trick assumes anyway (a -inf sentinel breaks ONNX shape inference: "cannot be converted
            # to int64_t without overflow").
            top = torch.cat((boxes.flatten(), boxes.new_zeros((1,)))).max()
            offsets = idxs.to(boxes) * (top + torch.tensor(1).to(boxes))
            return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, float(iou_threshold))
        import torchvision

        return torchvision.ops.batched_nms(boxes, scores, idxs, float(iou_threshold))
    if tracing:
        return torch.ops.maskrcnn.batched_nms(boxes, scores, idxs, float(iou_threshold))
    return batched_nms_native(boxes, scores, idxs, iou_threshold)


def batched_nms_limited(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, limit: int) -> Tensor:
    """The first ``limit`` indices of per-class NMS (:func:`batched_nms_native`: IoUs on the original coordinates,
    exactly per-class :func:`nms`), computed on the highest-scoring boxes only.

    Whether a box survives depends only on the boxes of its class visited before it (higher score, or equal score
    and lower index). NMS over a prefix of that visiting order therefore decides the prefix exactly as NMS over all
    boxes does, and its survivors are the first survivors of the full result. The prefix starts at ``4 * limit``
    boxes (extended over ties with its last score) and grows fourfold until it yields ``limit`` survivors or holds
    every box. Final detections (``TEST.DETECTIONS_PER_IM`` = 100 of up to 80 classes x 1000 RoIs) need NMS over a
    few hundred boxes instead of 80 000.

    Returns:
        int64 indices into ``boxes``, by decreasing score (ties by index), at most ``limit`` of them
        (empty for ``(0, 4)`` or ``(0,)`` boxes). Always native; one op under ``torch.jit.trace``.
    """
    boxes, scores = _dequantized(boxes, scores)
    _check_inputs(boxes, scores, idxs)
    limit = int(limit)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if torch.jit.is_tracing():
        return torch.ops.maskrcnn.batched_nms_limited(boxes.reshape(-1, 4), scores, idxs, float(iou_threshold), limit)
    n = boxes.shape[0]
    if n == 0 or limit == 0:
        return _empty_keep(boxes)
    work = scores.to(_work_dtype(boxes, scores))
    order = torch.sort(work, descending=True, stable=True).indices
    size = 4 * limit
    while True:
        if size >= n:
            return batched_nms_native(boxes, scores, idxs, iou_threshold)[:limit]
        # Every box tying with the prefix's last score joins it, so the prefix ends between two scores.
        size = int(torch.count_nonzero(work >= work[order[size - 1]]))
        if size >= n:
            continue
        cand = order[:size]
        keep = batched_nms_native(boxes[cand], scores[cand], idxs[cand], iou_threshold)
        if keep.numel() >= limit:
            # Local indices follow the global visiting order, so ties keep their global index order.
            return cand[keep[:limit]]
        size *= 4


# Opaque forms of the native ops for torch.jit.trace: the native algorithms branch on data in Python,
# which a trace would freeze for its example input. Recorded as single ops, a trace (saved or not)
# calls the native implementation again at run time, for any number of boxes. The fake kernels give
# torch.export / torch.compile the output's (data-dependent) length.
@torch.library.custom_op("maskrcnn::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return nms_native(boxes, scores, iou_threshold)


@torch.library.custom_op("maskrcnn::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return batched_nms_native(boxes, scores, idxs, iou_threshold)


@torch.library.custom_op("maskrcnn::batched_nms_limited", mutates_args=())
def _batched_nms_limited_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, limit: int) -> Tensor:
    # The public function dispatches here when tracing; this runs the eager path.
    return batched_nms_limited(boxes, scores, idxs, iou_threshold, limit)


def _fake_keep(boxes: Tensor, *args: object) -> Tensor:
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


for _op in (_nms_op, _batched_nms_op, _batched_nms_limited_op):
    _op.register_fake(_fake_keep)
