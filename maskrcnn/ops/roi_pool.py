"""RoIPool (Fast R-CNN's max RoI pooling) in pure PyTorch, equal to ``torchvision.ops.roi_pool``.

Semantics (torchvision's CPU/CUDA kernels):

* box corners are scaled by ``spatial_scale`` and rounded half away from zero to integer pixels;
  the RoI spans ``x2 - x1 + 1`` by ``y2 - y1 + 1`` pixels (at least 1);
* bin ``p`` of ``n`` covers pixels ``[floor(p * s), ceil((p + 1) * s))`` with ``s = span / n``,
  shifted by the RoI corner and clipped to the map;
* a bin outputs the channel-wise max over its pixels, the first one in row-major order on ties,
  and 0 when the clipped bin is empty; the gradient flows to that argmax pixel only;
* as torchvision's running max starts at ``-FLT_MAX`` (float32's lowest finite value, in every dtype)
  and takes only greater values, NaN pixels are never the max, and a bin with no pixel above
  ``-FLT_MAX`` (all ``-inf``, or float64 values below it) outputs ``-FLT_MAX`` and passes no gradient.

Algorithm: the feature map is laid out as a ``(N*H*W, C)`` channels-last table, followed by
"max-window" levels: level ``l`` holds, at pixel ``x``, the max over columns ``[x, x + 2**l)`` of
its row (one ``torch.maximum`` pass per level, ``2**l <= 8``). Each row of a bin is covered by
(usually two) overlapping windows of the largest width that fits, so a bin reads about ``2 x rows``
table rows instead of ``rows x cols``. All bins of all RoIs are reduced by one
``embedding_bag(mode="max")`` (bins grouped by their read counts only to build the index list,
short ones padded with repeats). Windows are visited row by row in order of their start and each
keeps its leftmost maximum, so the first maximum in row-major order wins, as in torchvision. The
returned argmax rows take the gradient; backward pushes window gradients down the levels to the
pixel holding each window's maximum. Empty bins read a zero row appended to the table.

Dtypes: float32/float64 in their own dtype; float16/bfloat16 are pooled in float32 (exact for a
max) and returned in the input dtype. The output has the input's memory format.
"""

from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from maskrcnn.ops import _backend
from maskrcnn.ops.roi_align import (
    PlanBlock,
    RoIs,
    as_roi_tensor,
    check_batch_index,
    check_features,
    compute_dtype,
    empty_channels_output,
    feature_meta,
    new_output,
    outer_plan,
    output_grad_rows,
    output_rows_to_nchw,
    pack_features,
    pair_size,
    slot_bucket,
    torchvision_work_dtype,
    unpack_grad,
    write_rois,
)


# Widest max-window is 2**_MAX_WINDOW_LEVEL pixels: each level costs one pass over the features
# (and a copy of them in memory) but divides the reads of wide bins by about two.
_MAX_WINDOW_LEVEL = 3


def _round_half_away(v: Tensor) -> Tensor:
    # C++ std::round; torch.round rounds half to even. v - trunc(v) is exact in floating point.
    whole = torch.trunc(v)
    return (whole + torch.sign(v) * ((v - whole).abs() >= 0.5)).long()


def _bin_bounds(start: Tensor, span: Tensor, num_bins: int, size: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """[lo, hi) pixel range (R, num_bins) of every bin along one axis, clipped to ``[0, size]``."""
    bin_size = span.to(dtype) / num_bins
    p = torch.arange(num_bins, device=start.device).to(dtype)
    lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def _row_slots(lo: Tensor, hi: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """Every pixel of each bin: index (R, n, K) (short bins repeat their last pixel) and bucketed K (R,)."""
    count = (hi - lo).clamp(min=0)
    slots = slot_bucket(count.amax(1).clamp(min=1))
    k = torch.arange(int(slots.max()) if slots.numel() else 1, device=lo.device)
    return (lo[:, :, None] + torch.minimum(k, (count - 1).clamp(min=0)[:, :, None])).clamp(max=size - 1), slots


def _window_level(width: Tensor, max_level: int) -> Tensor:
    # Largest l with 2**l <= width (width >= 1), capped at max_level; exact on small ints.
    level = torch.zeros_like(width)
    for l in range(1, max_level + 1):
        level += (width >= 2**l).long()
    return level


def _window_slots(lo: Tensor, hi: Tensor, max_level: int, level_rows: int) -> Tuple[Tensor, Tensor]:
    """Max-windows covering each bin's columns: table column index (R, n, K) and bucketed K (R,).

    A bin of width w reads windows of width ``k = 2**level`` (the largest power of two <= w, at
    most ``2**max_level``) starting at ``lo, lo + k, ...`` and a last one ending at ``hi``; level
    ``l`` maps live ``l * level_rows`` rows down the table. Windows overlap but stay in order of
    their start, so the first maximum in row-major order is still the one found.
    """
    width = (hi - lo).clamp(min=1)
    level = _window_level(width, max_level)
    k = 2**level
    count = (width + k - 1) // k
    slots = slot_bucket(count.amax(1).clamp(min=1))
    j = torch.arange(int(slots.max()) if slots.numel() else 1, device=lo.device)
    start = torch.minimum(lo[:, :, None] + j * k[:, :, None], (lo + width - k)[:, :, None])
    return start + (level * level_rows)[:, :, None], slots


def _max_windows(table: Tensor, rows: int, height: int, width: int, levels: int, track: bool) -> List[Tensor]:
    """Fill level ``l`` of ``table`` with the max over columns ``[x, x + 2**l)``, ``x <= width - 2**l``.

    ``table`` holds ``levels + 1`` blocks of ``rows = N*H*W`` rows (block 0 = the features); columns
    past the last full window are left unset (never read). With ``track``, returns for each level
    the (H', valid, C) bool map "the right half holds the first maximum" that routes gradients.
    """
    c = table.shape[1]
    right_wins = []
    for l in range(1, levels + 1):
        half, valid = 2 ** (l - 1), width - 2**l + 1
        prev = table[(l - 1) * rows : l * rows].view(height, width, c)
        left, right = prev[:, :valid], prev[:, half : half + valid]
        torch.maximum(left, right, out=table[l * rows : (l + 1) * rows].view(height, width, c)[:, :valid])
        if track:
            # Strictly greater: the left half wins ties, keeping the first maximum.
            right_wins.append(right > left)
    return right_wins


def _push_down(grad_table: Tensor, right_wins: List[Tensor], rows: int, height: int, width: int) -> Tensor:
    """Route gradients of max-windows (levels ``len(right_wins)`` .. 1) to the pixels of level 0."""
    c = grad_table.shape[1]
    for l in range(len(right_wins), 0, -1):
        half, valid = 2 ** (l - 1), width - 2**l + 1
        g = grad_table[l * rows : (l + 1) * rows].view(height, width, c)[:, :valid]
        prev = grad_table[(l - 1) * rows : l * rows].view(height, width, c)
        to_left = torch.where(right_wins[l - 1], 0.0, g)
        prev[:, :valid].add_(to_left)
        prev[:, half : half + valid].add_(g - to_left)  # exactly g or 0
    return grad_table[:rows]


#: torchvision's starting max for a non-empty bin (float32's largest finite value, in every dtype).
_FLT_MAX = float(torch.finfo(torch.float32).max)


class _RoIPoolFunction(torch.autograd.Function):
    """Bag maxima over the features' max-window table (+ one zero row); differentiable in the features only."""

    @staticmethod
    def forward(ctx, plan: List[PlanBlock], num_rois: int, output_size: Tuple[int, int], dtype, levels: int, input):
        n, c, h, w = input.shape
        rows = n * h * w
        table = pack_features([input], dtype, extra_rows=levels * rows + 1)
        # torchvision's kernel keeps a pixel only if it exceeds the running max, which starts at -FLT_MAX: NaN
        # is never kept, and a bin with nothing above -FLT_MAX (all -inf, or float64 below it) returns -FLT_MAX
        # with no argmax. Pixels it would never keep become -FLT_MAX here (the table is a copy).
        pixels = table[:rows]
        pixels.nan_to_num_(nan=-_FLT_MAX, posinf=float("inf"), neginf=-_FLT_MAX)
        if pixels.dtype == torch.float64:  # only float64 holds finite values below -FLT_MAX: a second pass there
            pixels.clamp_(min=-_FLT_MAX)
        table[-1].zero_()
        track = ctx.needs_input_grad[5]
        right_wins = _max_windows(table, rows, n * h, w, levels, track)
        out = new_output(num_rois, c, output_size, input)
        argmaxes = []
        for rois, index, _ in plan:
            bags, k = index.shape
            if bags == 0:
                continue
            offsets = torch.arange(0, bags * k, k, dtype=index.dtype, device=index.device)
            maxima, _, _, argmax = torch.ops.aten._embedding_bag(
                table, index.reshape(-1), offsets, False, 2, False, None, False, -1
            )
            write_rois(out, rois, 0, output_rows_to_nchw(maxima, output_size))
            if track:
                # A bin that kept no pixel (its max is the -FLT_MAX start) passes no gradient, as in
                # torchvision: its argmax goes to the zero row, whose gradient is dropped.
                argmax = torch.where(maxima == -_FLT_MAX, table.shape[0] - 1, argmax)
            argmaxes.append(argmax)
        if track:
            ctx.save_for_backward(*right_wins, *argmaxes)
            ctx.levels, ctx.block_rois = levels, [b.rois for b in plan if b.index.shape[0]]
            ctx.table_rows, ctx.image_rows, ctx.width = table.shape[0], n * h, w
            ctx.meta = feature_meta([input])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        right_wins, argmaxes = list(saved[: ctx.levels]), saved[ctx.levels :]
        dtype = compute_dtype(ctx.meta[0][1])
        # Bins' maxima -> the windows they read (the zero row collects empty bins) -> pixels.
        grad_table = grad.new_zeros((ctx.table_rows, grad.shape[1]), dtype=dtype)
        for rois, argmax in zip(ctx.block_rois, argmaxes):
            grad_table.scatter_add_(0, argmax, output_grad_rows(grad, dtype, rois))
        rows = ctx.image_rows * ctx.width
        grad_pixels = _push_down(grad_table, right_wins, rows, ctx.image_rows, ctx.width)
        return (None, None, None, None, None, *unpack_grad(grad_pixels, ctx.meta, [True]))


def _roi_pool_native(input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float) -> Tensor:
    if input.shape[1] == 0:
        return empty_channels_output(input, rois.shape[0], output_size)
    n, c, h, w = input.shape
    oh, ow = output_size
    dtype = compute_dtype(input.dtype)
    rois = rois.detach().to(device=input.device, dtype=dtype)
    batch = check_batch_index(rois, n)
    corners = _round_half_away(rois[:, 1:] * torch.tensor(spatial_scale, dtype=dtype, device=input.device))
    x1, y1, x2, y2 = corners.unbind(1)
    y_lo, y_hi = _bin_bounds(y1, (y2 - y1 + 1).clamp(min=1), oh, h, dtype)
    x_lo, x_hi = _bin_bounds(x1, (x2 - x1 + 1).clamp(min=1), ow, w, dtype)
    widest = int((x_hi - x_lo).max()) if rois.shape[0] else 1
    levels = int(_window_level(torch.tensor(max(widest, 1)), _MAX_WINDOW_LEVEL))
    rows = n * h * w
    iy, ky = _row_slots(y_lo, y_hi, h)
    ix, kx = _window_slots(x_lo, x_hi, levels, rows)
    row_part = (batch * (h * w))[:, None, None] + iy * w
    empty = (y_hi <= y_lo)[:, :, None] | (x_hi <= x_lo)[:, None, :]
    table_rows = (levels + 1) * rows + 1
    plan = outer_plan(row_part, None, ix, None, ky, kx, table_rows, empty=empty, empty_index=table_rows - 1)
    return _RoIPoolFunction.apply(plan, rois.shape[0], output_size, dtype, levels, input)


def roi_pool(
    input: Tensor, rois: RoIs, output_size: Union[int, Tuple[int, int]], spatial_scale: float = 1.0
) -> Tensor:
    """Max RoI pooling of ``rois`` on ``input``.

    Args:
        input: (N, C, H, W) float features.
        rois: (R, 5) ``[batch_idx, x1, y1, x2, y2]`` or a list of N ``(Ri, 4)`` boxes in image
            coordinates (scaled by ``spatial_scale``; corners are inclusive after rounding).
        output_size: ``oh`` (square) or ``(oh, ow)``.
        spatial_scale: feature-map size / image size.
    Returns:
        (R, C, oh, ow) in ``input``'s dtype. Backend per :func:`maskrcnn.ops._backend.resolve`
        ("roi_pool"); the native one is differentiable in ``input``. Under ``torch.jit.trace`` the
        native backend is recorded as one op, ``maskrcnn::roi_pool``, valid for any sizes.
    """
    check_features([input], "input")
    output_size = pair_size(output_size)
    roi_tensor = as_roi_tensor(rois, features=input)
    if _backend.resolve("roi_pool") == "torchvision":
        import torchvision

        work = torchvision_work_dtype(input)
        out = torchvision.ops.roi_pool(input.to(work), roi_tensor.to(work), output_size, float(spatial_scale))
        return out if work == input.dtype else out.to(input.dtype)
    if torch.jit.is_tracing():
        return torch.ops.maskrcnn.roi_pool(input, roi_tensor, float(spatial_scale), output_size[0], output_size[1])
    return _roi_pool_native(input, roi_tensor, output_size, float(spatial_scale))


# torch.fx symbolic tracing (torchvision's feature extraction, FX quantization) records the op as one call
# instead of tracing into its checks of the input's shape, as torchvision does for its own ops.
torch.fx.wrap("roi_pool")


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` with fixed ``output_size`` and ``spatial_scale``."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float) -> None:
        super().__init__()
        self.output_size = pair_size(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: RoIs) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


# Opaque form of the native op for torch.jit.trace (the plan branches on data in Python, which a trace
# would freeze for its example input).
@torch.library.custom_op("maskrcnn::roi_pool", mutates_args=())
def _roi_pool_op(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    return _roi_pool_native(input, rois, (pooled_height, pooled_width), spatial_scale)


@_roi_pool_op.register_fake
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    return new_output(rois.shape[0], input.shape[1], (pooled_height, pooled_width), input)


def _roi_pool_setup_context(ctx, inputs, output) -> None:
    input, rois, *ctx.args = inputs
    ctx.save_for_backward(input, rois)


def _roi_pool_op_backward(ctx, grad: Tensor):
    # The argmax routing lives in _RoIPoolFunction; running it again is simpler than exposing it and
    # costs one forward pass, on the traced path only.
    input, rois = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width = ctx.args
    with torch.enable_grad():
        leaf = input.detach().requires_grad_()
        out = _roi_pool_native(leaf, rois, (pooled_height, pooled_width), spatial_scale)
    (grad_input,) = torch.autograd.grad(out, leaf, grad)
    return grad_input, None, None, None, None


_roi_pool_op.register_autograd(_roi_pool_op_backward, setup_context=_roi_pool_setup_context)
