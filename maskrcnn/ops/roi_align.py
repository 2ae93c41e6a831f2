"""RoIAlign (Mask R-CNN's bilinear RoI feature transform) in pure PyTorch.

:func:`roi_align` returns what ``torchvision.ops.roi_align`` returns, up to float rounding:

* box corners are multiplied by ``spatial_scale`` (and shifted by -0.5 when ``aligned``); with
  ``aligned=False`` RoI sides shorter than 1 are raised to 1;
* each of the ``oh x ow`` bins averages ``gh x gw`` bilinear samples placed at the centres of a
  regular sub-grid, ``gh = sampling_ratio`` or, when ``sampling_ratio <= 0``, ``ceil(roi_h / oh)``
  (likewise ``gw``); the average divides by ``max(gh * gw, 1)``;
* a sample with ``y < -1`` or ``y > H`` (or ``x < -1``, ``x > W``) contributes 0; inside that band
  coordinates are clamped into ``[0, H - 1]`` (``[0, W - 1]``), i.e. the border row is repeated;
* with ``aligned=True`` and adaptive sampling an inverted box has a non-positive grid, runs no
  sample and gives 0 (torchvision's CPU kernel fails on such boxes when only one side is inverted).

Sample coordinates are computed with torchvision's operation order in the compute dtype, so they are
bit-identical to its CPU kernel's; only the accumulation order differs.

Algorithm. Bilinear weights and the border rules are separable, so for every RoI the per-axis
samples of a bin (``g`` samples, 2 neighbours each) are first reduced to a short list of
``(row, weight)`` "slots": when the samples are at most 1 pixel apart (always true for adaptive
sampling) the neighbours of consecutive samples coincide and the slots are the ``span <= g + 1``
consecutive rows the bin touches, with the weights of equal rows summed; otherwise the ``2g`` raw
neighbours are kept. A bin then reads the ``ky x kx`` outer product of its two slot lists from the
feature map laid out as a ``(N*H*W, C)`` table of contiguous channel vectors, through a weighted
``embedding_bag`` (multithreaded, vectorised over channels). RoIs with equal (bucketed) slot counts
form one block whose index/weight arrays are built by broadcasting; each block is gathered in
cache-sized RoI chunks written straight into the output. Huge RoIs cost at most ``H x W`` reads per
bin (slots never exceed the map), not ``gh x gw x 4``.

The backward pass is the transposed sparse product, RoI chunk by RoI chunk: the chunk's (index, weight)
entries are sorted by feature row (a stable radix sort), a second weighted ``embedding_bag`` sums, for
every feature row the chunk touches, the gradients of the bins that read it, and ``index_add_`` adds
those per-row sums into a separate gradient tensor per input map. No atomics, so it is deterministic.
(``index_add_`` of the raw per-entry products measured ~6x slower on CPU; pre-summed rows are few.)
The sampling plan built in forward is kept for backward (when the features need a gradient): ~8 bytes per
(bin, sample) entry, a few MB for a training step's RoIs, against a rebuild that was about a fifth of the op's
time at 32 channels. Otherwise no temporary larger than a chunk exists, which keeps a training step's peak memory
under torchvision's.

Dtypes: float32 and float64 are computed in their own dtype; float16 and bfloat16 are computed in
float32 (coordinates, weights and accumulation) and the result is rounded to the input dtype.
The output has the input's memory format (channels_last input gives channels_last output).
"""

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from maskrcnn.ops import _backend
from maskrcnn.ops._errors import RoIShapeError

RoIs = Union[Tensor, Sequence[Tensor]]

# Size of the per-chunk bag buffer of the CPU forward pass (fits in L2/L3 caches).
_CHUNK_BYTES = 1 << 22
# Per-axis slot counts above this are rounded up (<= 12.5% zero-weight padding) so that RoIs of
# similar size share one index-building group; below it every count is its own group.
_EXACT_SLOTS = 8


def as_roi_tensor(rois: RoIs, name: str = "rois", features: Optional[Tensor] = None) -> Tensor:
    """``(R, 5)`` rois ``[batch_idx, x1, y1, x2, y2]`` from that tensor or a list of ``(Ri, 4)`` boxes per image.

    An empty list is one box list per image of a batch of zero images: accepted when ``features``
    (the ``(N, C, H, W)`` map the rois are for) has ``N == 0``, giving ``(0, 5)`` rois in its dtype.
    """
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise RoIShapeError(
                f"{name} must be a (R, 5) tensor [batch_idx, x1, y1, x2, y2], got shape {tuple(rois.shape)}"
            )
        return rois
    if not isinstance(rois, (list, tuple)):
        raise RoIShapeError(f"{name} must be a (R, 5) tensor or a list of (Ri, 4) tensors, got {type(rois).__name__}")
    if len(rois) == 0:
        if features is not None and features.shape[0] == 0:
            return features.new_zeros((0, 5))
        raise RoIShapeError(f"{name} is an empty list; pass one (Ri, 4) tensor per image (Ri may be 0)")
    for i, b in enumerate(rois):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise RoIShapeError(f"{name}[{i}] must be a (Ri, 4) tensor, got {getattr(b, 'shape', type(b))}")
    dtype = rois[0].dtype
    # new_full with each list entry's own length (not a tensor of Python counts) keeps the RoI counts
    # symbolic under torch.jit.trace.
    return torch.cat(
        [torch.cat((b.new_full((b.shape[0], 1), i, dtype=dtype), b.to(dtype)), 1) for i, b in enumerate(rois)]
    )


def torchvision_work_dtype(input: Tensor) -> torch.dtype:
    """The dtype torchvision's RoI kernels run ``input`` in: float32 for float16/bfloat16 on the CPU, whose kernels
    have neither (as torchvision's autocast wrapper does), else ``input``'s own."""
    if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return input.dtype


def pair_size(output_size: Union[int, Sequence[int]], name: str = "output_size") -> Tuple[int, int]:
    """``(h, w)`` from an int or a pair of positive ints."""
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        size = (output_size, output_size)
    elif isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        size = tuple(output_size)
    else:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {output_size!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{name} must hold positive ints, got {output_size!r}")
    return int(size[0]), int(size[1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the native kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_batch_index(rois: Tensor, num_images: int, name: str = "rois") -> Tensor:
    """Column 0 of ``rois`` as int64, raising ``ValueError`` when it is not an index in ``[0, num_images)``."""
    batch = rois[:, 0].long()
    outside = (batch < 0) | (batch >= num_images) | (rois[:, 0] != batch)
    if bool(outside.any()):
        raise ValueError(f"{name}[:, 0] must hold integer batch indices in [0, {num_images}), got values outside it")
    return batch


class PlanBlock(NamedTuple):
    """RoIs whose bins all read K table rows: bag ``j`` sums ``weight[j, k] * table[index[j, k]]`` over k.

    Bags are ordered RoI-major, then ``(ph, pw)``; a plan is a list of blocks covering every RoI once.
    """

    rois: Optional[Tensor]  # (Rg,) int64 output position of the block's RoIs; None: all RoIs, in order
    index: Tensor  # (Rg*oh*ow, K) int32/int64 rows of the (M, C) table
    weight: Optional[Tensor]  # (Rg*oh*ow, K) weights in the compute dtype (None: unweighted)


def slot_bucket(k: Tensor) -> Tensor:
    # Exact up to _EXACT_SLOTS, then rounded up to a multiple of 2**(ceil(log2 k) - 3).
    e = torch.ceil(torch.log2(k.clamp(min=1).double()))
    step = torch.exp2((e - 3).clamp(min=0)).long()
    return torch.where(k <= _EXACT_SLOTS, k, (k + step - 1) // step * step)


def _axis_slots(
    start: Tensor, bin_size: Tensor, grid: Tensor, num_bins: int, size: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-axis (row, weight) slots of every bin.

    start, bin_size: (R,) compute dtype; grid: (R,) int64 >= 0 samples per bin; size: (R,) int64
    length of the axis. Returns index (R, num_bins, K) int64 in ``[0, size)``, weight
    (R, num_bins, K) and the bucketed slot count (R,) of each RoI (its slots past it weigh 0).
    """
    dtype, device = start.dtype, start.device
    num_rois = start.shape[0]
    per_roi = grid * num_bins
    total = int(per_roi.sum())
    roi = torch.repeat_interleave(torch.arange(num_rois, device=device), per_roi, output_size=total)
    local = torch.arange(total, device=device) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
    g = grid[roi]
    p = local // g
    i = local - p * g
    step = bin_size[roi]
    # torchvision's order: (start + p * bin) + ((i + .5) * bin) / grid.
    pos = (start[roi] + p.to(dtype) * step) + ((i.to(dtype) + 0.5) * step) / g.to(dtype)
    length = size[roi]
    valid = (pos >= -1.0) & (pos <= length)
    pos = torch.where(valid, pos, torch.zeros((), dtype=dtype, device=device)).clamp(min=0)
    lo = pos.long()
    at_end = lo >= length - 1
    lo = torch.where(at_end, length - 1, lo)
    hi = torch.where(at_end, lo, lo + 1)
    frac = torch.where(at_end, torch.zeros((), dtype=dtype, device=device), pos - lo.to(dtype))
    w_hi = frac * valid
    w_lo = (1.0 - frac) * valid

    num = num_rois * num_bins
    bin_id = roi * num_bins + p
    never = int(size.max()) + 1 if num_rois else 1
    first = torch.full((num,), never, dtype=torch.long, device=device)
    first.scatter_reduce_(0, bin_id, torch.where(valid, lo, never), "amin")
    last = torch.full((num,), -1, dtype=torch.long, device=device)
    last.scatter_reduce_(0, bin_id, torch.where(valid, hi, -1), "amax")
    touched = last >= 0
    first = torch.where(touched, first, 0)
    last = torch.where(touched, last, 0)
    span = torch.where(touched, last - first + 1, 0).view(num_rois, num_bins).amax(1)
    raw = 2 * grid
    compact = span <= raw
    slots = slot_bucket(torch.where(compact, span, raw))
    # At least one slot, so that zero-weight writes of out-of-map samples have somewhere to land.
    k_max = max(int(slots.max()), 1) if num_rois else 0

    ar = torch.arange(k_max, device=device)
    index = torch.minimum(first[:, None] + ar, last[:, None])
    weight = torch.zeros(num * k_max, dtype=dtype, device=device)
    if total:
        sample_compact = compact[roi]
        base = first[bin_id]
        slot_lo = torch.where(sample_compact, torch.where(valid, lo - base, 0), 2 * i)
        slot_hi = torch.where(sample_compact, torch.where(valid, hi - base, 0), 2 * i + 1)
        flat = bin_id * k_max
        weight.index_put_((flat + slot_lo,), w_lo, accumulate=True)
        weight.index_put_((flat + slot_hi,), w_hi, accumulate=True)
        sample_raw = ~sample_compact
        if bool(sample_raw.any()):
            flat_index = index.view(-1)
            flat_index[(flat + slot_lo)[sample_raw]] = lo[sample_raw]
            flat_index[(flat + slot_hi)[sample_raw]] = hi[sample_raw]
    return index.view(num_rois, num_bins, k_max), weight.view(num_rois, num_bins, k_max), slots


def outer_plan(
    row_part: Tensor,
    row_weight: Optional[Tensor],
    col_index: Tensor,
    col_weight: Optional[Tensor],
    row_slots: Tensor,
    col_slots: Tensor,
    num_rows: int,
    empty: Optional[Tensor] = None,
    empty_index: int = 0,
) -> List[PlanBlock]:
    """Bags of the outer products of per-axis slots, as blocks of RoIs with equal slot counts.

    row_part: (R, oh, Ky) int64 table row of column 0 of each y-slot; col_index: (R, ow, Kx) int64
    column of each x-slot; row_weight / col_weight: matching weights (None: no weights). RoI ``r``
    uses the first ``row_slots[r]`` x ``col_slots[r]`` slots of each bin, row-major (y then x).
    ``empty`` (R, oh, ow) bool sends all entries of those bins to row ``empty_index``. Indices are
    int32 when the table's ``num_rows`` allow it (half the memory traffic of int64).
    """
    if num_rows < 2**31:
        row_part, col_index = row_part.int(), col_index.int()

    def outer(y: Tensor, x: Tensor, ky: int, kx: int, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        # (n, oh, Ky), (n, ow, Kx) -> (n, oh, ow, ky * kx) with element (a, b) at a * kx + b. Both sides are
        # widened to ky * kx first: a broadcast whose two innermost dims are a few slots long runs ~3x slower.
        y = y[:, :, :ky].repeat_interleave(kx, dim=2)
        x = x[:, :, :kx].repeat(1, 1, ky)
        return op(y[:, :, None, :], x[:, None, :, :])

    def block(sel: Optional[Tensor], ky: int, kx: int) -> PlanBlock:
        rp, ci = (row_part, col_index) if sel is None else (row_part[sel], col_index[sel])
        index = outer(rp, ci, ky, kx, torch.add)
        if empty is not None:
            bins_empty = empty if sel is None else empty[sel]
            index = torch.where(bins_empty[:, :, :, None], empty_index, index)
        bags = index.shape[0] * index.shape[1] * index.shape[2]
        index = index.view(bags, ky * kx)
        if row_weight is None:
            return PlanBlock(sel, index, None)
        wy, wx = (row_weight, col_weight) if sel is None else (row_weight[sel], col_weight[sel])
        return PlanBlock(sel, index, outer(wy, wx, ky, kx, torch.mul).view(bags, ky * kx))

    if row_part.shape[0] == 0:
        return [block(None, 0, 0)]
    kx_max = int(col_slots.max())
    if row_weight is not None:
        # One block of the largest slot counts when the zero-weight padding adds at most a quarter of the
        # entries: each block costs a dozen small operations here and a gather (and a sort in backward), more
        # than the padded entries at the RoI counts of a training step. (Slots past a RoI's count weigh 0 and
        # repeat its last row.) Unweighted (max) plans keep exact blocks.
        ky_max = int(row_slots.max())
        if 4 * row_part.shape[0] * ky_max * kx_max <= 5 * int((row_slots * col_slots).sum()):
            return [block(None, ky_max, kx_max)]
    key = row_slots * (kx_max + 1) + col_slots
    groups, inverse = torch.unique(key, return_inverse=True)
    if groups.numel() == 1:
        return [block(None, int(row_slots[0]), int(col_slots[0]))]
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=groups.numel()).tolist()
    blocks = []
    for sel in torch.split(order, counts):
        r0 = int(sel[0])
        blocks.append(block(sel, int(row_slots[r0]), int(col_slots[r0])))
    return blocks


def roi_align_plan(
    rois: Tensor,
    scale: Tensor,
    heights: Tensor,
    widths: Tensor,
    row_base: Tensor,
    output_size: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    num_rows: int,
) -> List[PlanBlock]:
    """The bilinear sampling matrix of RoIAlign over a flat ``(num_rows, C)`` feature table.

    rois: (R, 5) in the compute dtype; scale: (R,) spatial scale of each RoI's map (compute dtype);
    heights, widths: (R,) int64 size of each RoI's map; row_base: (R,) int64 table row of pixel
    (0, 0) of the RoI's image in its map (rows are ``row_base + y * width + x``).
    """
    oh, ow = output_size
    dtype, device = rois.dtype, rois.device
    num_rois = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / oh
    bin_w = roi_w / ow
    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long, device=device)
        grid_w = grid_h
    else:
        grid_h = torch.ceil(bin_h).long()
        grid_w = torch.ceil(bin_w).long()
    inv_count = 1.0 / (grid_h * grid_w).clamp(min=1).to(dtype)
    # A non-positive grid (aligned, inverted box, adaptive sampling) runs no sample: the bin is 0.
    grid_h = grid_h.clamp(min=0)
    grid_w = grid_w.clamp(min=0)
    iy, wy, ky = _axis_slots(y1, bin_h, grid_h, oh, heights)
    ix, wx, kx = _axis_slots(x1, bin_w, grid_w, ow, widths)
    row_part = row_base[:, None, None] + iy * widths[:, None, None]
    return outer_plan(row_part, wy * inv_count[:, None, None], ix, wx, ky, kx, num_rows)


def check_features(features: Sequence[Tensor], name: str = "features") -> None:
    """Raise ``ValueError`` unless ``features`` are (N, C, H_l, W_l) float maps sharing N, C, dtype and device."""
    if len(features) == 0:
        raise ValueError(f"{name} must hold at least one (N, C, H, W) tensor")
    for i, f in enumerate(features):
        label = f"{name}[{i}]" if len(features) > 1 else name
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"{label} must be a (N, C, H, W) tensor, got {getattr(f, 'shape', type(f))}")
        if not f.is_floating_point():
            raise ValueError(f"{label} must be a floating point tensor, got {f.dtype}")
        if f.shape[2] == 0 or f.shape[3] == 0:
            raise ValueError(f"{label} must have non-empty spatial dims, got shape {tuple(f.shape)}")
        ref = features[0]
        if f.shape[:2] != ref.shape[:2] or f.dtype != ref.dtype or f.device != ref.device:
            raise ValueError(
                f"{label} has (N, C) = {tuple(f.shape[:2])}, {f.dtype}, {f.device}; "
                f"expected {tuple(ref.shape[:2])}, {ref.dtype}, {ref.device} like {name}[0]"
            )


def pack_features(features: Sequence[Tensor], dtype: torch.dtype, extra_rows: int = 0) -> Tensor:
    """Levels (N, C, H_l, W_l) -> one (sum_l N*H_l*W_l + extra_rows, C) table, level-major, rows ``(n, y, x)``.

    One strided copy per level (none is made differentiable: callers own the backward). The extra
    rows are left uninitialised for the caller.
    """
    c = features[0].shape[1]
    channels_last = features[0].detach().permute(0, 2, 3, 1)
    if len(features) == 1 and extra_rows == 0 and channels_last.dtype == dtype and channels_last.is_contiguous():
        return channels_last.view(-1, c)  # channels_last input, or C == 1: already a table
    rows = sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features)
    table = torch.empty((rows + extra_rows, c), dtype=dtype, device=features[0].device)
    start = 0
    for f in features:
        n, _, h, w = f.shape
        table[start : start + n * h * w].view(n, h, w, c).copy_(f.detach().permute(0, 2, 3, 1))
        start += n * h * w
    return table


def feature_meta(features: Sequence[Tensor]) -> List[Tuple[torch.Size, torch.dtype, torch.memory_format]]:
    """What :func:`unpack_grad` needs of the features (so backward does not keep them alive)."""
    return [(f.shape, f.dtype, _memory_format(f)) for f in features]


def unpack_grad(
    grad_table: Tensor, meta: Sequence[Tuple[torch.Size, torch.dtype, torch.memory_format]], needs: Sequence[bool]
) -> List[Optional[Tensor]]:
    """Inverse layout of :func:`pack_features` for gradients, each in its feature's dtype and memory format."""
    grads: List[Optional[Tensor]] = []
    start = 0
    c = grad_table.shape[1]
    for (shape, dtype, memory_format), need in zip(meta, needs):
        n, _, h, w = shape
        if need:
            g = grad_table[start : start + n * h * w].view(n, h, w, c).permute(0, 3, 1, 2)
            grads.append(g.to(dtype).contiguous(memory_format=memory_format))
        else:
            grads.append(None)
        start += n * h * w
    return grads


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_rows_to_nchw(rows: Tensor, output_size: Tuple[int, int]) -> Tensor:
    """(n*oh*ow, C) bag rows -> (n, C, oh, ow) view."""
    return rows.view(-1, output_size[0], output_size[1], rows.shape[1]).permute(0, 3, 1, 2)


def write_rois(out: Tensor, rois: Optional[Tensor], start: int, values: Tensor) -> None:
    """``out[rois[start:start+n]] = values`` (``rois`` None: the RoIs are ``start .. start+n-1``)."""
    if rois is None:
        out[start : start + values.shape[0]].copy_(values)
    else:
        out.index_copy_(0, rois[start : start + values.shape[0]], values.to(out.dtype))


def new_output(num_rois: int, c: int, output_size: Tuple[int, int], like: Tensor) -> Tensor:
    """Uninitialised (R, C, oh, ow) output in ``like``'s dtype, device and memory format."""
    shape = (num_rois, c) + tuple(output_size)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_memory_format(like))


def output_grad_rows(grad: Tensor, dtype: torch.dtype, rois: Union[None, slice, Tensor] = None) -> Tensor:
    """(R, C, oh, ow) output gradient -> (n*oh*ow, C) contiguous rows in ``dtype`` of RoIs ``rois`` (indices or a
    slice; None: all)."""
    if isinstance(rois, Tensor):
        grad = grad.index_select(0, rois)
    elif rois is not None:
        grad = grad[rois]
    # One copy: the permuted view is contiguous only for channels-last gradients.
    return grad.permute(0, 2, 3, 1).to(dtype).contiguous().view(-1, grad.shape[1])


def _roi_chunk(table: Tensor, bins: int) -> int:
    # CPU: RoIs per embedding_bag call, so that the (bags, C) buffer stays in cache and is reused
    # instead of a whole-output temporary (fresh pages plus a second pass over it).
    if table.device.type != "cpu":
        return 1 << 62
    return max(1, _CHUNK_BYTES // (bins * table.shape[1] * table.element_size()))


def _plan_forward(table: Tensor, plan: List[PlanBlock], out: Tensor) -> Tensor:
    num_rois, c, oh, ow = out.shape
    bins = oh * ow
    chunk = _roi_chunk(table, bins)
    for rois, index, weight in plan:
        n = index.shape[0] // bins
        if index.shape[1] == 0:
            write_rois(out, rois, 0, out.new_zeros((n, c, oh, ow)))
            continue
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            bags = F.embedding_bag(
                index[r0 * bins : r1 * bins], table, mode="sum", per_sample_weights=weight[r0 * bins : r1 * bins]
            )
            write_rois(out, rois, r0, output_rows_to_nchw(bags, (oh, ow)))
    return out


def _plan_backward(grad: Tensor, plan: List[PlanBlock], meta: Sequence[Tuple[torch.Size, torch.dtype, Any]],
                   needs: Sequence[bool], dtype: torch.dtype) -> List[Optional[Tensor]]:
    """``S^T @ grad``: (R, C, oh, ow) output gradient -> the gradient of each packed feature map (None where
    ``needs`` is False), each a tensor of its own in channels-last layout.

    Chunk by chunk of RoIs (``_CHUNK_BYTES`` of gradient rows each): the chunk's (row, weight) entries are sorted
    by table row (stable radix sort), one weighted ``embedding_bag`` over the chunk's gradient rows sums the bins
    that read each touched row, and ``index_add_`` adds those sums into the level the rows belong to.
    Deterministic, no atomics. Memory: only chunk-sized temporaries besides the results; and the results are
    separate tensors, not views of one table, so that autograd can add another branch's gradient (the box and
    mask poolers read the same maps) into them in place and free each level once used.

    Each level's gradient is built in its feature's dtype: the bins' sums are taken in ``dtype`` (float32 for
    bf16/fp16 features) and rounded once per chunk as they are added, as autograd rounds each branch's gradient
    when it adds them. A float32 buffer cast at the end would cost a zero fill and a conversion of the whole map
    (P2 at batch 2 is 28M values) for every pooler of a mixed-precision training step.
    """
    num_rois, c, oh, ow = grad.shape
    bins = oh * ow
    starts, levels = [], []
    start = 0
    for (shape, f_dtype, _), need in zip(meta, needs):
        n, _, h, w = shape
        starts.append(start)
        levels.append(torch.zeros((n, h, w, c), dtype=f_dtype, device=grad.device).permute(0, 3, 1, 2)
                      if need else None)
        start += n * h * w
    # Rows of each level's gradient, in table order (a view: the tensors are channels-last).
    level_rows = [None if g is None else g.permute(0, 2, 3, 1).view(-1, c) for g in levels]
    bounds = torch.tensor(starts[1:], dtype=torch.int64, device=grad.device)
    chunk = max(1, _CHUNK_BYTES // (bins * c * grad.element_size())) if grad.device.type == "cpu" else 1 << 62
    for rois, index, weight in plan:
        k = index.shape[1]
        n = index.shape[0] // bins
        if k == 0 or n == 0:
            continue
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            rows = output_grad_rows(grad, dtype, slice(r0, r1) if rois is None else rois[r0:r1])
            entries = index[r0 * bins : r1 * bins].reshape(-1)
            touched, perm = torch.sort(entries, stable=True)
            touched, counts = torch.unique_consecutive(touched, return_counts=True)
            offsets = counts.cumsum(0) - counts
            sums = F.embedding_bag(perm // k, rows, offsets, mode="sum",
                                   per_sample_weights=weight[r0 * bins : r1 * bins].reshape(-1)[perm])
            cuts = [0] + torch.searchsorted(touched, bounds.to(touched.dtype)).tolist() + [touched.numel()]
            for level, out in enumerate(level_rows):
                a, b = cuts[level], cuts[level + 1]
                if out is not None and b > a:
                    out.index_add_(0, touched[a:b] - starts[level], sums[a:b].to(out.dtype))
    return levels


#: The tables packed inside a :func:`shared_feature_tables` block: ``(features, their versions, dtype, table)``.
_SHARED_TABLES: ContextVar[Optional[List[Tuple[Tuple[Tensor, ...], List[int], torch.dtype, Tensor]]]] = ContextVar(
    "maskrcnn_roi_align_shared_tables", default=None)


@contextlib.contextmanager
def shared_feature_tables() -> Iterator[None]:
    """Within the block, RoIAlign calls that pool the same feature maps (the same tensor objects, not modified in
    between) in the same compute dtype pack them into their ``(rows, C)`` table once.

    At inference the box and mask (and keypoint) heads of one forward pool the same FPN levels: at 800x1066 packing
    P2-P5 is a 19M-value copy, and from bf16 features a conversion too. ``ROIHeads`` opens the block around its
    inference heads. The tables, and references to the features, live until the block ends, so it is not used in
    training, where they would add to the step's peak memory."""
    token = _SHARED_TABLES.set([])
    try:
        yield
    finally:
        _SHARED_TABLES.reset(token)


def _packed_table(features: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    shared = _SHARED_TABLES.get()
    if shared is None:
        return pack_features(features, dtype)
    # Inference tensors (torch.inference_mode) keep no version counter: for them the identity alone decides.
    versions = [-1 if f.is_inference() else f._version for f in features]
    for feats, vers, dt, table in shared:
        if dt == dtype and len(feats) == len(features) and vers == versions and all(
                a is b for a, b in zip(feats, features)):
            return table
    table = pack_features(features, dtype)
    shared.append((tuple(features), versions, dtype, table))
    return table


class _RoIAlignFunction(torch.autograd.Function):
    """Bag sums of a plan over packed feature maps; differentiable in the features only."""

    @staticmethod
    def forward(ctx, plan: List[PlanBlock], num_rois: int, output_size: Tuple[int, int], dtype, *features: Tensor):
        table = _packed_table(features, dtype)
        # The plan is kept for backward rather than rebuilt there: building it is most of the op's time at
        # few channels (2.5 of 12 ms forward + backward for 256 RoIs at 7x7 and 32 channels, one thread), while
        # it holds ~8 bytes per (bin, sample) entry (about 6 MB for 1024 RoIs at 7x7), small next to the
        # activations of the step that needs it.
        ctx.plan = plan if any(ctx.needs_input_grad[4:]) else None
        ctx.dtype = dtype
        ctx.meta = feature_meta(features)
        return _plan_forward(table, plan, new_output(num_rois, table.shape[1], output_size, features[0]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        needs = ctx.needs_input_grad[4:]
        grads = [None] * len(needs)
        if any(needs):
            grads = _plan_backward(grad, ctx.plan, ctx.meta, needs, ctx.dtype)
        return (None, None, None, None, *grads)


def apply_roi_align_plan(
    features: Sequence[Tensor], plan: List[PlanBlock], num_rois: int, output_size: Tuple[int, int],
    dtype: torch.dtype,
) -> Tensor:
    """(R, C, oh, ow) RoIAlign output of ``plan`` over the packed ``features``, differentiable in them (the plan
    is kept for backward while a feature needs a gradient)."""
    return _RoIAlignFunction.apply(plan, num_rois, output_size, dtype, *features)


def _single_map_plan(
    shape: Sequence[int], rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
    aligned: bool,
) -> List[PlanBlock]:
    """Plan of RoIAlign on one (N, C, H, W) map of ``shape``; ``rois`` (R, 5) in the compute dtype."""
    n, _, h, w = shape
    batch = check_batch_index(rois, n)
    num_rois, dtype, device = rois.shape[0], rois.dtype, rois.device
    scale = torch.full((num_rois,), float(spatial_scale), dtype=dtype, device=device)
    heights = torch.full((num_rois,), h, dtype=torch.long, device=device)
    widths = torch.full((num_rois,), w, dtype=torch.long, device=device)
    row_base = batch * (h * w)
    return roi_align_plan(rois, scale, heights, widths, row_base, output_size, sampling_ratio, aligned, n * h * w)


def empty_channels_output(input: Tensor, num_rois: int, output_size: Tuple[int, int]) -> Tensor:
    """The (R, 0, oh, ow) result of pooling a map with no channels, as torchvision returns it, still attached to
    ``input``'s autograd graph (its gradient is empty)."""
    return input.new_zeros((num_rois, 0) + tuple(output_size)) + input.sum()


def _roi_align_native(
    input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    if input.shape[1] == 0:
        return empty_channels_output(input, rois.shape[0], output_size)
    dtype = compute_dtype(input.dtype)
    rois = rois.detach().to(device=input.device, dtype=dtype)
    plan = _single_map_plan(input.shape, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return apply_roi_align_plan([input], plan, rois.shape[0], output_size, dtype)


def roi_align(
    input: Tensor,
    rois: RoIs,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of ``rois`` on ``input``.

    Args:
        input: (N, C, H, W) float features.
        rois: (R, 5) ``[batch_idx, x1, y1, x2, y2]`` or a list of N ``(Ri, 4)`` boxes, in the
            coordinates of the image ``input`` was computed from (scaled by ``spatial_scale``).
        output_size: ``oh`` (square) or ``(oh, ow)``.
        spatial_scale: feature-map size / image size (e.g. 1/4 for FPN's P2).
        sampling_ratio: samples per bin side; ``<= 0`` is adaptive (``ceil(roi_side / bins)``).
        aligned: shift boxes by -0.5 pixel (detectron2); False is Detectron's legacy RoIAlign.
    Returns:
        (R, C, oh, ow) in ``input``'s dtype. Backend per :func:`maskrcnn.ops._backend.resolve`
        ("roi_align"); the native one is differentiable in ``input`` (not in ``rois``, like torchvision).
        Under ``torch.jit.trace`` the native backend is recorded as one op, ``maskrcnn::roi_align``
        (differentiable too), so the trace holds for any input size and number of RoIs.
    """
    check_features([input], "input")
    output_size = pair_size(output_size)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    roi_tensor = as_roi_tensor(rois, features=input)
    if _backend.resolve("roi_align") == "torchvision":
        import torchvision

        work = torchvision_work_dtype(input)
        out = torchvision.ops.roi_align(
            input.to(work), roi_tensor.to(work), output_size, float(spatial_scale), sampling_ratio, bool(aligned)
        )
        return out if work == input.dtype else out.to(input.dtype)
    if torch.jit.is_tracing():
        return torch.ops.maskrcnn.roi_align(
            input, roi_tensor, float(spatial_scale), output_size[0], output_size[1], sampling_ratio, bool(aligned)
        )
    return _roi_align_native(input, roi_tensor, output_size, float(spatial_scale), sampling_ratio, bool(aligned))


# torch.fx symbolic tracing (torchvision's feature extraction, FX quantization) records the op as one call
# instead of tracing into its checks of the input's shape, as torchvision does for its own ops.
torch.fx.wrap("roi_align")


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (fixed ``output_size``, ``spatial_scale``, ``sampling_ratio``, ``aligned``)."""

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = pair_size(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: RoIs) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


# Opaque form of the native op for torch.jit.trace: building the sampling plan branches on data in
# Python (slot counts, groups, chunks), which a trace would freeze for its example input. Recorded as
# one op, a trace (saved or not) rebuilds the plan at run time for whatever sizes it is given.
@torch.library.custom_op("maskrcnn::roi_align", mutates_args=())
def _roi_align_op(
    input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return _roi_align_native(input, rois, (pooled_height, pooled_width), spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return new_output(rois.shape[0], input.shape[1], (pooled_height, pooled_width), input)


def _roi_align_setup_context(ctx, inputs, output) -> None:
    input, rois, *ctx.args = inputs
    ctx.meta = feature_meta([input])
    ctx.save_for_backward(rois)


def _roi_align_op_backward(ctx, grad: Tensor):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
    shape, input_dtype, _ = ctx.meta[0]
    dtype = compute_dtype(input_dtype)
    rois = rois.detach().to(device=grad.device, dtype=dtype)
    output_size = (pooled_height, pooled_width)
    plan = _single_map_plan(shape, rois, output_size, spatial_scale, sampling_ratio, aligned)
    (grad_input,) = _plan_backward(grad, plan, ctx.meta, [True], dtype)
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_roi_align_op_backward, setup_context=_roi_align_setup_context)
