"""Instance masks: training targets cropped to RoIs, polygon rasterisation, and pasting predictions into images.

Two ways to build the ``M x M`` mask-head targets exist:

* :func:`project_masks_on_boxes` (torchvision's way) starts from binary masks at image resolution
  and bilinearly samples them with ``roi_align(aligned=False)``. Targets are soft (values in
  ``[0, 1]`` along object edges), inherit the staircase of the image-resolution rasterisation, and
  are shifted by half an image pixel towards the top-left: with ``aligned=False`` the value of
  pixel ``k`` is taken to sit at continuous coordinate ``k`` rather than at its centre ``k + 0.5``.
  For a box ``w`` pixels wide that is ``M / (2 w)`` target cells, which matters for small boxes.
* :func:`project_polygons_on_boxes` (Detectron's way) maps the ground-truth polygons into the
  box frame and rasterises them directly at ``M x M``. Targets are binary, follow the polygon
  geometry at target resolution, and have no half-pixel shift. It needs the polygons, so it only
  applies to polygon annotations (not to RLE "crowd"-style masks).

Boxes are ``(x1, y1, x2, y2)`` float absolute pixels in the continuous convention (width ``x2 - x1``).
"""

from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.ops.grid_paste import paste_masks_grid_sample
from maskrcnn.ops.roi_align import roi_align

PolygonLike = Union[Sequence[float], np.ndarray, Tensor]

# Upper bound on the number of floats held by one chunk's temporaries in paste_masks_in_image.
_PASTE_CHUNK_ELEMENTS = 1 << 24
# Largest stacked mask map (floats) project_masks_on_boxes_batch builds; beyond it images go one by one.
_BATCH_TARGET_ELEMENTS = 1 << 25


def _check_box_batch(boxes: Tensor, matched_idxs: Tensor, fn: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{fn}: boxes must be a (R, 4) tensor, got {shape}")
    if not isinstance(matched_idxs, Tensor) or matched_idxs.shape != (boxes.shape[0],):
        shape = tuple(matched_idxs.shape) if isinstance(matched_idxs, Tensor) else type(matched_idxs).__name__
        raise ValueError(f"{fn}: matched_idxs must be a ({boxes.shape[0]},) tensor (one per box), got {shape}")
    if matched_idxs.is_floating_point() or matched_idxs.dtype == torch.bool:
        raise TypeError(f"{fn}: matched_idxs must be an integer tensor, got {matched_idxs.dtype}")


def _check_matched_range(matched_idxs: Tensor, num_gt: int, fn: str) -> None:
    if matched_idxs.numel() == 0:
        return
    lo, hi = int(matched_idxs.min()), int(matched_idxs.max())
    if lo < 0 or hi >= num_gt:
        raise ValueError(f"{fn}: matched_idxs must lie in [0, {num_gt}) (number of ground truths), got [{lo}, {hi}]")


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, M: int) -> Tensor:
    """Crop and resize each box's matched ground-truth mask to ``M x M`` (mask-head targets).

    Equal to torchvision's ``roi_heads.project_masks_on_boxes``: ``roi_align`` of the masks
    (as floats) with output ``(M, M)``, ``spatial_scale=1``, adaptive sampling ratio and
    ``aligned=False``. See the module docstring for how it differs from the polygon route.

    Args:
        gt_masks: ``(G, H, W)`` uint8 / bool / float masks of one image, in image pixels.
        boxes: ``(R, 4)`` float boxes in the same pixels.
        matched_idxs: ``(R,)`` integer, the ground-truth index in ``[0, G)`` of each box.
        M: output side.

    Returns:
        ``(R, M, M)`` targets in ``[0, 1]``, in ``boxes``' dtype (float32 for float32 boxes) and device.
    """
    fn = "project_masks_on_boxes"
    _check_box_batch(boxes, matched_idxs, fn)
    if not isinstance(gt_masks, Tensor) or gt_masks.dim() != 3:
        shape = tuple(gt_masks.shape) if isinstance(gt_masks, Tensor) else type(gt_masks).__name__
        raise ValueError(f"{fn}: gt_masks must be a (G, H, W) tensor, got {shape}")
    if int(M) != M or M <= 0:
        raise ValueError(f"{fn}: M must be a positive integer, got {M!r}")
    M = int(M)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, M, M))
    _check_matched_range(matched_idxs, gt_masks.shape[0], fn)
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (M, M), spatial_scale=1.0, sampling_ratio=-1, aligned=False)[
        :, 0
    ]


def project_masks_on_boxes_batch(gt_masks: Sequence[Tensor], boxes: Sequence[Tensor],
                                 matched_idxs: Sequence[Tensor], M: int) -> List[Tensor]:
    """:func:`project_masks_on_boxes` of every image of a batch, in one RoIAlign call when that is exact.

    Args:
        gt_masks, boxes, matched_idxs: per image, as :func:`project_masks_on_boxes` takes them (the masks of
            different images may differ in size).

    Returns:
        per image ``(R_i, M, M)`` targets, equal to the per-image calls (up to float rounding).

    The masks are stacked into one ``(sum G_i, 1, H_max, W_max)`` map, each padded at the bottom and right by
    repeating its last row and column: RoIAlign (``aligned=False``) clamps samples in ``(H - 1, H]`` to the last
    row, and the repeated row gives the same value there. That holds for samples at most ``H`` (``W``): every box
    with ``max(y2, y1 + 1) <= H`` and ``max(x2, x1 + 1) <= W`` in its own image (proposals clipped to the image, and
    ground-truth boxes, are); otherwise, or when the stacked map would exceed ``_BATCH_TARGET_ELEMENTS`` floats, the
    images are done one by one. One call instead of one per image saves the per-call planning of RoIAlign, most of
    the cost at the sizes of a training step.
    """
    fn = "project_masks_on_boxes_batch"
    if not (len(gt_masks) == len(boxes) == len(matched_idxs)):
        raise ValueError(f"{fn}: gt_masks, boxes and matched_idxs must have one entry per image, got "
                         f"{len(gt_masks)}, {len(boxes)}, {len(matched_idxs)}")
    floats = [b if b.is_floating_point() else b.float() for b in boxes]
    for g, b, m in zip(gt_masks, floats, matched_idxs):
        _check_box_batch(b, m, fn)
        if not isinstance(g, Tensor) or g.dim() != 3:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{fn}: gt_masks must be (G, H, W) tensors, got {shape}")
    used = [i for i, b in enumerate(floats) if b.shape[0] > 0]
    batched = len(used) > 1 and len({floats[i].dtype for i in used}) == 1
    if batched:
        h_max = max(int(gt_masks[i].shape[-2]) for i in used)
        w_max = max(int(gt_masks[i].shape[-1]) for i in used)
        batched = sum(int(gt_masks[i].shape[0]) for i in used) * h_max * w_max <= _BATCH_TARGET_ELEMENTS
    if batched:
        # One check (one device sync) for all boxes: the far edge of every sample within its own image.
        all_boxes = torch.cat([floats[i] for i in used])
        limits = torch.cat([all_boxes.new_tensor([[gt_masks[i].shape[-1], gt_masks[i].shape[-2]]])
                            .expand(floats[i].shape[0], 2) for i in used])
        batched = bool((torch.maximum(all_boxes[:, 2:], all_boxes[:, :2] + 1) <= limits).all())
    if not batched:
        return [project_masks_on_boxes(g, b, m, M) for g, b, m in zip(gt_masks, floats, matched_idxs)]
    dtype = all_boxes.dtype
    maps, stacked_idxs, first = [], [], 0
    for i in used:
        g = gt_masks[i]
        _check_matched_range(matched_idxs[i], g.shape[0], fn)
        h, w = g.shape[-2:]
        m = g[:, None].to(device=all_boxes.device, dtype=dtype)
        maps.append(F.pad(m, (0, w_max - w, 0, h_max - h), mode="replicate") if (h, w) != (h_max, w_max) else m)
        stacked_idxs.append(matched_idxs[i] + first)
        first += g.shape[0]
    rois = torch.cat([torch.cat(stacked_idxs).to(all_boxes)[:, None], all_boxes], dim=1)
    out = roi_align(torch.cat(maps), rois, (M, M), spatial_scale=1.0, sampling_ratio=-1, aligned=False)[:, 0]
    parts = iter(torch.split(out, [floats[i].shape[0] for i in used]))
    return [next(parts) if b.shape[0] > 0 else b.new_zeros((0, M, M)) for b in floats]


def _as_flat_polygon(poly: PolygonLike, where: str) -> List[float]:
    if isinstance(poly, Tensor):
        poly = poly.detach().cpu().numpy()
    flat = np.asarray(poly, dtype=np.float64).reshape(-1)
    # pycocotools reads a 4-number list as a box, and fewer than 3 points enclose nothing.
    if flat.size < 6 or flat.size % 2 != 0:
        raise ValueError(
            f"{where}: a polygon must be a flat [x0, y0, x1, y1, ...] list of at least 3 points, "
            f"got {flat.size} numbers"
        )
    return flat.tolist()


def _rasterize(polygons: List[List[float]], height: int, width: int) -> np.ndarray:
    if not polygons:
        return np.zeros((height, width), dtype=np.uint8)
    import pycocotools.mask as mask_util  # here, so that importing the ops does not load pycocotools

    rles = mask_util.frPyObjects(polygons, height, width)
    return np.ascontiguousarray(mask_util.decode(mask_util.merge(rles)), dtype=np.uint8)


def polygons_to_mask(polygons: Sequence[PolygonLike], height: int, width: int) -> Tensor:
    """Rasterise one instance given as COCO polygons into a binary mask (pycocotools).

    Args:
        polygons: the instance's polygons, each a flat ``[x0, y0, x1, y1, ...]`` list / array in
            image pixels (at least 3 points); they are merged (union), so an instance split
            into several parts gives one mask. An empty list gives an empty mask.
        height, width: mask size.

    Returns:
        ``(height, width)`` uint8 tensor with values in ``{0, 1}`` (CPU).
    """
    height, width = int(height), int(width)
    if height < 0 or width < 0:
        raise ValueError(f"polygons_to_mask: height and width must be >= 0, got ({height}, {width})")
    if isinstance(polygons, (np.ndarray, Tensor)) and polygons.ndim == 1:
        raise ValueError("polygons_to_mask: polygons must be a list of polygons, got a single flat polygon")
    flat = [_as_flat_polygon(p, "polygons_to_mask") for p in polygons]
    if height == 0 or width == 0:
        return torch.zeros((height, width), dtype=torch.uint8)
    return torch.from_numpy(_rasterize(flat, height, width))


def project_polygons_on_boxes(
    polygons_per_gt: Sequence[Sequence[PolygonLike]], boxes: Tensor, matched_idxs: Tensor, M: int
) -> Tensor:
    """Rasterise each box's matched ground-truth polygons directly in the box frame at ``M x M``.

    Detectron's ``polys_to_mask_wrt_box``: the polygons are shifted by the box's top-left corner
    and scaled by ``M / w``, ``M / h`` with ``w = max(x2 - x1, 1)``, ``h = max(y2 - y1, 1)``,
    then rasterised with pycocotools. See the module docstring for how it differs from
    :func:`project_masks_on_boxes`. Runs on the CPU (pycocotools), one box at a time.

    Args:
        polygons_per_gt: for each of the ``G`` ground truths, its list of flat polygons in image pixels.
        boxes: ``(R, 4)`` float boxes in image pixels.
        matched_idxs: ``(R,)`` integer, the ground-truth index in ``[0, G)`` of each box.
        M: output side.

    Returns:
        ``(R, M, M)`` float32 binary targets on ``boxes``' device.
    """
    fn = "project_polygons_on_boxes"
    _check_box_batch(boxes, matched_idxs, fn)
    if int(M) != M or M <= 0:
        raise ValueError(f"{fn}: M must be a positive integer, got {M!r}")
    M = int(M)
    _check_matched_range(matched_idxs, len(polygons_per_gt), fn)
    boxes_np = boxes.detach().cpu().double().numpy()
    idxs = matched_idxs.detach().cpu().tolist()
    flat_cache = {}
    targets = np.zeros((boxes_np.shape[0], M, M), dtype=np.float32)
    for r, (box, gt) in enumerate(zip(boxes_np, idxs)):
        if gt not in flat_cache:
            flat_cache[gt] = [_as_flat_polygon(p, f"{fn} (ground truth {gt})") for p in polygons_per_gt[gt]]
        x1, y1, x2, y2 = box
        scale_x = M / max(x2 - x1, 1.0)
        scale_y = M / max(y2 - y1, 1.0)
        in_box = []
        for poly in flat_cache[gt]:
            p = np.asarray(poly, dtype=np.float64)
            p[0::2] = (p[0::2] - x1) * scale_x
            p[1::2] = (p[1::2] - y1) * scale_y
            in_box.append(p.tolist())
        targets[r] = _rasterize(in_box, M, M)
    return torch.from_numpy(targets).to(boxes.device)


def _paste_axis_weights(
    start: Tensor, end: Tensor, size: int, image_size: int, dtype: torch.dtype
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for pasting: ``(N, image_size)`` indices i0, i1 and weights w0, w1.

    Image pixel ``p`` of mask ``n`` lies in its box when ``start[n] <= p <= end[n]``; it then takes
    the value of pixel ``p - start`` of the mask resized to ``max(end - start + 1, 1)`` pixels with
    ``F.interpolate(mode="bilinear", align_corners=False)``, whose arithmetic (source coordinate
    ``(dst + 0.5) * in / out - 0.5`` clamped at 0, in ``dtype``) is reproduced here so that results
    agree to rounding. Pixels outside the box get zero weights.
    """
    extent = (end - start + 1).clamp(min=1)
    pixels = torch.arange(image_size, device=start.device)
    offset = pixels[None, :] - start[:, None]
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] <= end[:, None])
    scale = torch.tensor(float(size), dtype=dtype, device=start.device) / extent.to(dtype)
    if dtype == torch.float32:
        # The interpolation kernels evaluate ``scale * (dst + 0.5) - 0.5`` as one fused multiply-add;
        # in float64 the product of two floats is exact, so one final rounding reproduces it.
        src = (scale[:, None].double() * (offset.to(dtype) + 0.5).double() - 0.5).to(dtype)
    else:
        src = scale[:, None] * (offset.to(dtype) + 0.5) - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().clamp(max=size - 1)
    lam = (src - i0).clamp(0, 1)
    i0 = i0.long().clamp(min=0)
    i1 = torch.where(i0 < size - 1, i0 + 1, i0)
    zero = torch.zeros((), dtype=dtype, device=start.device)
    w0 = torch.where(inside, 1 - lam, zero)
    w1 = torch.where(inside, lam, zero)
    return i0, i1, w0, w1, inside


def expanded_int_boxes(boxes: Tensor, ratio: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x1, y1, x2, y2)`` int64 ``(N,)`` of ``boxes`` ``(N, 4)`` scaled by ``ratio`` about their centres and
    truncated towards zero: the same float operations, in the boxes' dtype, as torchvision's ``expand_boxes``, so
    that the integer boxes a pasted mask covers are identical."""
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * ratio
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * ratio
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return ((centre_x - half_w).to(torch.int64), (centre_y - half_h).to(torch.int64),
            (centre_x + half_w).to(torch.int64), (centre_y + half_h).to(torch.int64))


def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, image_shape: Tuple[int, int], padding: int = 1
) -> Tensor:
    """Paste ``M x M`` mask probabilities into full images, as torchvision's ``paste_masks_in_image`` does.

    Each mask is zero-padded by ``padding`` pixels, its box is expanded by ``(M + 2p) / M`` about
    its centre and truncated to int64 (towards zero, as ``Tensor.to(torch.int64)`` does), the padded
    mask is bilinearly resized (``align_corners=False``) to the integer box size
    ``(y2 - y1 + 1, x2 - x1 + 1)`` and written at ``[y1..y2] x [x1..x2]`` clipped to the image.

    Instead of torchvision's Python loop (one interpolate + slice per mask) all masks are done at
    once with separable gathers: first along x for every mask (``N x (M+2p) x w`` values), then
    along y for the ``(mask, image row)`` pairs that lie inside the boxes only, written into the
    zero-initialised result. Work is proportional to the boxes' total height times ``w`` and
    temporaries stay within a few times ``2**24`` elements beside the ``(N, 1, h, w)`` result.

    Agreement with torchvision: the integer boxes, taps and weights are the same (the source
    coordinate is rounded as the interpolation kernels' fused multiply-add rounds it), so the
    pasted footprint is identical; only the rounding of the final two-tap blends may differ (the
    kernels may fuse them, and PyTorch's CPU kernel for small outputs, ``h + w <= 128``, is a
    different vectorised one), a few float32 ulps: below ``2e-7`` for probabilities in ``[0, 1]``
    (the tests assert ``1e-6``). Unlike torchvision, which raises or wraps around on negative
    slice bounds, a box that lies entirely outside the image pastes nothing.

    Args:
        masks: ``(N, 1, M, M)`` or ``(N, M, M)`` floating-point mask probabilities (square).
        boxes: ``(N, 4)`` float boxes in the pixels of the target image.
        image_shape: ``(h, w)`` of the output.
        padding: pixels of zero padding added around each mask before resizing (>= 0).

    Returns:
        ``(N, 1, h, w)`` tensor in ``masks``' dtype and device, zero outside each box. Under
        ``torch.jit.trace`` the call is recorded as one op, ``maskrcnn::paste_masks_in_image``, valid
        for any N and image size (``image_shape`` may then be ``image.shape[-2:]``).
    """
    fn = "paste_masks_in_image"
    if not isinstance(masks, Tensor) or masks.dim() not in (3, 4) or (masks.dim() == 4 and masks.shape[1] != 1):
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"{fn}: masks must be (N, 1, M, M) or (N, M, M), got {shape}")
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape[-1] != masks.shape[-2] or masks.shape[-1] == 0:
        raise ValueError(f"{fn}: masks must be square and non-empty, got {tuple(masks.shape[-2:])}")
    if not masks.is_floating_point():
        raise TypeError(f"{fn}: masks must be floating point (probabilities), got {masks.dtype}")
    if not isinstance(boxes, Tensor) or boxes.shape != (masks.shape[0], 4):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{fn}: boxes must be ({masks.shape[0]}, 4) (one per mask), got {shape}")
    if len(image_shape) != 2:
        raise ValueError(f"{fn}: image_shape must be (h, w), got {image_shape!r}")
    if torch.jit.is_tracing():
        # int(h) would freeze the example's image size into the trace (and the chunk loops its mask
        # count): record one op whose size argument is a tensor the trace keeps symbolic.
        size = torch.stack([torch.as_tensor(v, dtype=torch.int64) for v in image_shape])
        return torch.ops.maskrcnn.paste_masks_in_image(masks, boxes, size, int(padding))
    im_h, im_w = int(image_shape[0]), int(image_shape[1])
    if im_h < 0 or im_w < 0:
        raise ValueError(f"{fn}: image_shape must be non-negative, got {image_shape!r}")
    if int(padding) != padding or padding < 0:
        raise ValueError(f"{fn}: padding must be a non-negative integer, got {padding!r}")
    padding = int(padding)

    num = masks.shape[0]
    out = masks.new_zeros((num, 1, im_h, im_w))
    if num == 0 or im_h == 0 or im_w == 0:
        return out

    size = masks.shape[-1]
    padded_size = size + 2 * padding
    padded = F.pad(masks, (padding,) * 4)
    # Interpolation weights are computed in the type F.interpolate accumulates in.
    compute_dtype = torch.promote_types(masks.dtype, torch.float32)
    padded = padded.to(compute_dtype)

    if not boxes.is_floating_point():
        boxes = boxes.float()
    boxes = boxes.to(masks.device)
    x1, y1, x2, y2 = expanded_int_boxes(boxes, float(padded_size) / size)

    xi0, xi1, xw0, xw1, _ = _paste_axis_weights(x1, x2, padded_size, im_w, compute_dtype)
    yi0, yi1, yw0, yw1, y_inside = _paste_axis_weights(y1, y2, padded_size, im_h, compute_dtype)

    # Along x for every mask: (n, Mp, im_w), rows of the padded masks resized and placed
    # horizontally (zero outside each box's columns). Along y only the image rows that each box
    # covers are computed, as a flat list of (mask, row) pairs, so the work is proportional to
    # the boxes' heights rather than to N * h.
    out_rows = out.view(num * im_h, im_w)
    mask_chunk = max(1, _PASTE_CHUNK_ELEMENTS // (padded_size * im_w))
    pair_chunk = max(1, _PASTE_CHUNK_ELEMENTS // im_w)
    for s in range(0, num, mask_chunk):
        e = min(num, s + mask_chunk)
        n = e - s
        rows = torch.gather(padded[s:e], 2, xi0[s:e, None, :].expand(n, padded_size, im_w)) * xw0[s:e, None, :]
        rows += torch.gather(padded[s:e], 2, xi1[s:e, None, :].expand(n, padded_size, im_w)) * xw1[s:e, None, :]
        rows = rows.view(n * padded_size, im_w)
        pair_mask, pair_row = torch.nonzero(y_inside[s:e], as_tuple=True)
        for p in range(0, pair_mask.numel(), pair_chunk):
            k = pair_mask[p : p + pair_chunk]
            r = pair_row[p : p + pair_chunk]
            values = rows.index_select(0, k * padded_size + yi0[s + k, r]) * yw0[s + k, r, None]
            values += rows.index_select(0, k * padded_size + yi1[s + k, r]) * yw1[s + k, r, None]
            out_rows.index_copy_(0, (s + k) * im_h + r, values.to(out.dtype))
    return out


#: ``TEST.MASK_PASTE_METHOD`` values: torchvision's integer-box resize (:func:`paste_masks_in_image`) and detectron2's
#: float-box ``grid_sample`` (:func:`~maskrcnn.ops.grid_paste.paste_masks_grid_sample`).
MASK_PASTE_METHODS = ("torchvision", "detectron2")


def paste_masks_by_method(masks: Tensor, boxes: Tensor, image_shape: Tuple[int, int], method: str = "torchvision",
                          padding: int = 1) -> Tensor:
    """``(N, 1, M, M)`` probabilities pasted into ``(N, 1, h, w)`` images the way ``method``
    (``TEST.MASK_PASTE_METHOD``) names; ``padding`` (``TEST.MASK_PASTE_PADDING``) is read by ``"torchvision"`` only."""
    check_paste_method(method)
    if method == "detectron2":
        return paste_masks_grid_sample(masks, boxes, image_shape)
    return paste_masks_in_image(masks, boxes, image_shape, padding=padding)


def check_paste_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`MASK_PASTE_METHODS`."""
    if method not in MASK_PASTE_METHODS:
        raise ValueError(f"method must be one of {MASK_PASTE_METHODS} (the model's TEST.MASK_PASTE_METHOD), "
                         f"got {method!r}")


# Opaque form for torch.jit.trace; ``image_size`` is an int64 (2,) tensor (h, w) so that sizes read
# from shapes stay symbolic in the trace (int arguments of an op are recorded as constants).
@torch.library.custom_op("maskrcnn::paste_masks_in_image", mutates_args=())
def _paste_masks_op(masks: Tensor, boxes: Tensor, image_size: Tensor, padding: int) -> Tensor:
    height, width = image_size.tolist()
    return paste_masks_in_image(masks, boxes, (height, width), padding)


@_paste_masks_op.register_fake
def _paste_masks_fake(masks, boxes, image_size, padding):
    ctx = torch.library.get_ctx()
    return masks.new_empty((masks.shape[0], 1, ctx.new_dynamic_size(), ctx.new_dynamic_size()))
