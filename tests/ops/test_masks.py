import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image
from torchvision.models.detection.roi_heads import project_masks_on_boxes as tv_project_masks_on_boxes

import maskrcnn.ops.masks as masks_module
from maskrcnn.ops.masks import (
    paste_masks_in_image,
    polygons_to_mask,
    project_masks_on_boxes,
    project_masks_on_boxes_batch,
    project_polygons_on_boxes,
)

# float32 pasting differs from torchvision only by the rounding of the two multiply-adds of the
# bilinear blend (torchvision's kernels may fuse them); values are in [0, 1], so a few ulps of 1.
PASTE_ATOL = 1e-6


def _boxes_around(n, h, w, spread=1.4, max_rel_size=2.0):
    """Random boxes, many crossing the image border, sizes from sub-pixel to twice the image."""
    size = torch.tensor([w, h], dtype=torch.float32)
    centre = torch.rand(n, 2) * size * spread - size * (spread - 1) / 2
    wh = torch.rand(n, 2) ** 3 * size * max_rel_size
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=1)


# ----------------------------------------------------------------------------- project_masks_on_boxes


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32])
def test_project_masks_matches_torchvision(dtype):
    for _ in range(2):
        g, h, w = 4, 60, 80
        gt = torch.rand(g, h, w) > 0.5
        gt = gt.to(dtype) if dtype != torch.float32 else gt.float() * torch.rand(g, h, w)
        boxes = _boxes_around(40, h, w)
        boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        matched = torch.randint(0, g, (40,))
        for M in (14, 28, 5):
            ours = project_masks_on_boxes(gt, boxes, matched, M)
            expected = tv_project_masks_on_boxes(gt, boxes, matched, M)
            assert ours.shape == (40, M, M) and ours.dtype == torch.float32
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
            assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0 + 1e-6


def test_project_masks_empty_and_errors():
    gt = torch.zeros(2, 10, 10, dtype=torch.uint8)
    out = project_masks_on_boxes(gt, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 7)
    assert out.shape == (0, 7, 7) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="matched_idxs"):
        project_masks_on_boxes(gt, torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([2]), 7)
    with pytest.raises(ValueError, match="matched_idxs"):
        project_masks_on_boxes(gt, torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0, 1]), 7)
    with pytest.raises(ValueError, match="gt_masks"):
        project_masks_on_boxes(gt[0], torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0]), 7)
    with pytest.raises(ValueError, match="boxes"):
        project_masks_on_boxes(gt, torch.zeros(1, 5), torch.tensor([0]), 7)


def _inside_boxes(n, h, w):
    """Boxes inside an ``h x w`` image (as clipped proposals are), some under a pixel wide and some touching the
    bottom or right edge."""
    x = torch.sort(torch.rand(n, 2) * w, dim=1).values
    y = torch.sort(torch.rand(n, 2) * h, dim=1).values
    boxes = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
    boxes[: n // 4, 2] = w  # touching the right edge
    boxes[n // 4 : n // 2, 3] = h  # and the bottom one
    if n >= 3:
        boxes[-3:] = torch.tensor([[w - 1.0, h - 1.0, w - 0.2, h - 0.4], [0.0, 0.0, 0.3, 0.2], [w - 1.0, 0, w, h]])
    return boxes


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_project_masks_batch_equals_per_image(dtype, monkeypatch):
    import maskrcnn.ops.masks as masks_module

    calls = []
    real_roi_align = masks_module.roi_align
    monkeypatch.setattr(masks_module, "roi_align", lambda *a, **k: calls.append(1) or real_roi_align(*a, **k))
    torch.manual_seed(0)
    sizes = [(60, 80), (37, 91), (64, 64), (20, 30)]
    gts = [(torch.rand(g, h, w) > 0.5).to(dtype) for g, (h, w) in zip((3, 1, 0, 5), sizes)]
    boxes = [_inside_boxes(n, h, w) for n, (h, w) in zip((30, 12, 0, 9), sizes)]
    matched = [torch.randint(0, max(g.shape[0], 1), (b.shape[0],)) for g, b in zip(gts, boxes)]
    for M in (28, 7):
        calls.clear()
        ours = project_masks_on_boxes_batch(gts, boxes, matched, M)
        assert len(ours) == 4 and len(calls) == 1  # one RoIAlign for the batch
        for o, g, b, m in zip(ours, gts, boxes, matched):
            expected = tv_project_masks_on_boxes(g, b, m, M) if b.shape[0] else torch.zeros(0, M, M)
            assert o.shape == (b.shape[0], M, M)
            torch.testing.assert_close(o, expected, rtol=0, atol=1e-5)


def test_project_masks_batch_boxes_outside_and_errors():
    torch.manual_seed(1)
    gts = [torch.rand(2, 30, 40) > 0.5, torch.rand(3, 50, 20) > 0.5]
    boxes = [_boxes_around(20, 30, 40), _boxes_around(20, 50, 20)]  # crossing the borders: done image by image
    boxes = [torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1) for b in boxes]
    matched = [torch.randint(0, 2, (20,)), torch.randint(0, 3, (20,))]
    for o, g, b, m in zip(project_masks_on_boxes_batch(gts, boxes, matched, 14), gts, boxes, matched):
        torch.testing.assert_close(o, tv_project_masks_on_boxes(g, b, m, 14), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one entry per image"):
        project_masks_on_boxes_batch(gts, boxes[:1], matched, 14)
    with pytest.raises(ValueError, match=r"matched_idxs must lie in \[0, 2\)"):
        project_masks_on_boxes_batch(gts, [torch.tensor([[0.0, 0, 5, 5]])] * 2, [torch.tensor([2]), torch.tensor([0])], 7)
    with pytest.raises(ValueError, match="gt_masks must be"):
        project_masks_on_boxes_batch([gts[0][0], gts[1]], boxes, matched, 7)


# ----------------------------------------------------------------------------- polygons_to_mask


def _square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_polygons_to_mask_known_areas():
    m = polygons_to_mask([_square(0, 0, 10, 10)], 20, 20)
    assert m.dtype == torch.uint8 and m.shape == (20, 20)
    assert int(m.sum()) == 100 and bool(m[:10, :10].all())
    assert int(polygons_to_mask([_square(2, 3, 12, 8)], 20, 30).sum()) == 50
    # Half-pixel corners: pixel (i, j) is in when its centre is (pycocotools' rasteriser).
    m = polygons_to_mask([_square(2.5, 2.5, 7.5, 7.5)], 10, 10)
    assert int(m.sum()) == 25 and bool(m[3:8, 3:8].all())
    # Right triangle with legs 10: the 45 pixels whose centres are strictly inside.
    assert int(polygons_to_mask([[0, 0, 10, 0, 0, 10]], 20, 20).sum()) == 45
    # Clipped by the image.
    assert int(polygons_to_mask([_square(-5, -5, 5, 5)], 20, 20).sum()) == 25


def test_polygons_to_mask_merges_parts_of_one_instance():
    disjoint = polygons_to_mask([_square(0, 0, 10, 10), _square(12, 12, 17, 17)], 20, 20)
    assert int(disjoint.sum()) == 125
    overlapping = polygons_to_mask([_square(0, 0, 10, 10), np.array(_square(5, 5, 15, 15))], 20, 20)
    assert int(overlapping.sum()) == 175  # union, not sum
    assert int(overlapping.max()) == 1
    as_tensor = polygons_to_mask([torch.tensor(_square(0, 0, 10, 10), dtype=torch.float64)], 20, 20)
    assert int(as_tensor.sum()) == 100


def test_polygons_to_mask_empty_and_errors():
    assert polygons_to_mask([], 4, 6).shape == (4, 6)
    assert int(polygons_to_mask([], 4, 6).sum()) == 0
    with pytest.raises(ValueError, match="at least 3 points"):
        polygons_to_mask([[0, 0, 5, 5]], 10, 10)  # pycocotools would read 4 numbers as a box
    with pytest.raises(ValueError, match="at least 3 points"):
        polygons_to_mask([[0, 0, 5, 5, 3]], 10, 10)
    with pytest.raises(ValueError, match="list of polygons"):
        polygons_to_mask(np.array(_square(0, 0, 5, 5), dtype=np.float64), 10, 10)


# ----------------------------------------------------------------------------- project_polygons_on_boxes


def test_project_polygons_by_hand():
    polys = [
        [_square(10, 10, 30, 30)],  # gt 0: fills box 0 exactly
        [_square(10, 10, 20, 30)],  # gt 1: left half of box 0
        [_square(10, 10, 20, 20), _square(20, 20, 30, 30)],  # gt 2: two quadrants, merged
    ]
    boxes = torch.tensor([[10.0, 10, 30, 30]] * 3 + [[0.0, 0, 40, 40]])
    matched = torch.tensor([0, 1, 2, 0])
    out = project_polygons_on_boxes(polys, boxes, matched, 8)
    assert out.shape == (4, 8, 8) and out.dtype == torch.float32
    assert bool((out[0] == 1).all())
    expected_half = torch.zeros(8, 8)
    expected_half[:, :4] = 1
    assert torch.equal(out[1], expected_half)
    expected_quadrants = torch.zeros(8, 8)
    expected_quadrants[:4, :4] = 1
    expected_quadrants[4:, 4:] = 1
    assert torch.equal(out[2], expected_quadrants)
    # Box twice the polygon's size: polygon covers the central half of the target.
    expected_centre = torch.zeros(8, 8)
    expected_centre[2:6, 2:6] = 1
    assert torch.equal(out[3], expected_centre)


def test_project_polygons_boxes_over_the_border_and_tiny():
    polys = [[_square(0, 0, 10, 10)]]
    # The box extends left of the image; the polygon covers its right half.
    out = project_polygons_on_boxes(polys, torch.tensor([[-10.0, 0, 10, 10]]), torch.tensor([0]), 4)
    assert out[0].tolist() == [[0, 0, 1, 1]] * 4
    # Sub-pixel box: its width and height count as 1 pixel (Detectron), so the target is a
    # 1-pixel window starting at the box corner: here fully inside the polygon.
    out = project_polygons_on_boxes(polys, torch.tensor([[2.0, 2.0, 2.2, 2.3]]), torch.tensor([0]), 4)
    assert bool((out == 1).all())


def test_polygon_route_vs_mask_route():
    h, w = 64, 64
    poly = [[8, 6, 50, 10, 56, 44, 20, 58, 4, 30]]
    gt_mask = polygons_to_mask(poly, h, w)[None]
    boxes = torch.tensor([[4.0, 6, 56, 58], [0.0, 0, 64, 64], [10, 10, 40, 40]])
    matched = torch.zeros(3, dtype=torch.int64)
    via_polygons = project_polygons_on_boxes([poly], boxes, matched, 28)
    via_masks = project_masks_on_boxes(gt_mask, boxes, matched, 28)
    assert set(torch.unique(via_polygons).tolist()) <= {0.0, 1.0}
    # Same object, so the targets agree except along the boundary.
    assert float((via_polygons - via_masks).abs().mean()) < 0.06
    # Where the box is exactly a square object, the polygon route is all ones while the mask route
    # (roi_align with aligned=False) reads pixel k at coordinate k, half a pixel early, and fades
    # out along the last row and column.
    square = [_square(10, 10, 30, 30)]
    box = torch.tensor([[10.0, 10, 30, 30]])
    target_poly = project_polygons_on_boxes([square], box, torch.tensor([0]), 10)[0]
    target_mask = project_masks_on_boxes(polygons_to_mask(square, 40, 40)[None], box, torch.tensor([0]), 10)[0]
    assert bool((target_poly == 1).all())
    assert bool((target_mask[:-1, :-1] == 1).all())
    assert float(target_mask[:, -1].max()) < 1.0 and float(target_mask[-1, :].max()) < 1.0


def test_project_polygons_empty_and_errors():
    out = project_polygons_on_boxes([], torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 5)
    assert out.shape == (0, 5, 5)
    with pytest.raises(ValueError, match="matched_idxs"):
        project_polygons_on_boxes([[_square(0, 0, 4, 4)]], torch.zeros(1, 4), torch.tensor([1]), 5)
    with pytest.raises(TypeError, match="matched_idxs"):
        project_polygons_on_boxes([[_square(0, 0, 4, 4)]], torch.zeros(1, 4), torch.tensor([0.0]), 5)


# ----------------------------------------------------------------------------- paste_masks_in_image


def _tv_paste_or_none(masks, boxes, shape, padding):
    # torchvision raises (negative slice bounds) for boxes lying entirely outside the image.
    try:
        return tv_paste_masks_in_image(masks, boxes, shape, padding)
    except RuntimeError:
        return None


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_paste_matches_torchvision_random_boxes(padding):
    compared = 0
    for _ in range(60):
        n = int(torch.randint(1, 6, ()).item())
        M = int(torch.randint(1, 30, ()).item())
        h, w = (int(v) for v in torch.randint(1, 90, (2,)))
        masks = torch.rand(n, 1, M, M)
        boxes = _boxes_around(n, h, w)
        expected = _tv_paste_or_none(masks, boxes, (h, w), padding)
        if expected is None:
            continue
        ours = paste_masks_in_image(masks, boxes, (h, w), padding)
        assert ours.shape == (n, 1, h, w) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, rtol=0, atol=PASTE_ATOL)
        # The pasted footprint (integer box clipped to the image) is identical.
        assert torch.equal(ours != 0, expected != 0)
        compared += 1
    assert compared >= 30


def test_paste_adversarial_boxes_match_torchvision():
    h, w = 50, 70
    boxes = torch.tensor(
        [
            [-20.0, -15.0, 30.0, 25.0],  # over the top-left corner
            [60.0, 40.0, 95.0, 80.0],  # over the bottom-right corner
            [-100.0, -100.0, 200.0, 150.0],  # far larger than the image
            [10.3, 10.7, 10.9, 11.2],  # sub-pixel
            [20.0, 20.0, 20.0, 20.0],  # zero size
            [35.0, 30.0, 31.0, 26.0],  # x2 < x1, y2 < y1
            [0.0, 0.0, 70.0, 50.0],  # exactly the image
            [-0.4, -0.6, 5.5, 4.5],  # truncation towards zero of negative coordinates
        ]
    )
    for M in (28, 14, 1):
        masks = torch.rand(len(boxes), 1, M, M)
        expected = tv_paste_masks_in_image(masks, boxes, (h, w), 1)
        ours = paste_masks_in_image(masks, boxes, (h, w), 1)
        torch.testing.assert_close(ours, expected, rtol=0, atol=PASTE_ATOL)
        assert torch.equal(ours != 0, expected != 0)


def test_paste_boxes_entirely_outside_paste_nothing():
    h, w = 30, 40
    boxes = torch.tensor(
        [[-40.0, 5, -10, 20], [50.0, 5, 70, 20], [5.0, -50, 20, -10], [5.0, 35, 20, 60], [5.0, 5, 20, 20]]
    )
    masks = torch.rand(5, 1, 14, 14) + 0.1
    ours = paste_masks_in_image(masks, boxes, (h, w))
    assert bool((ours[:4] == 0).all())
    torch.testing.assert_close(ours[4:], tv_paste_masks_in_image(masks[4:], boxes[4:], (h, w)), rtol=0, atol=PASTE_ATOL)


def test_paste_float64_matches_torchvision():
    masks = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    boxes = _boxes_around(6, 60, 50, spread=1.0).double()
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    ours = paste_masks_in_image(masks, boxes, (60, 50))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, tv_paste_masks_in_image(masks, boxes, (60, 50)), rtol=0, atol=1e-12)


def test_paste_realistic_batch_and_chunking(monkeypatch):
    n, h, w = 40, 240, 320
    masks = torch.rand(n, 1, 28, 28)
    boxes = _boxes_around(n, h, w, spread=1.0, max_rel_size=0.8)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    expected = tv_paste_masks_in_image(masks, boxes, (h, w))
    ours = paste_masks_in_image(masks, boxes, (h, w))
    torch.testing.assert_close(ours, expected, rtol=0, atol=PASTE_ATOL)
    # Tiny chunks (a few image rows at a time, a few masks at a time) give the same result.
    monkeypatch.setattr(masks_module, "_PASTE_CHUNK_ELEMENTS", 3 * 28 * w)
    assert torch.equal(paste_masks_in_image(masks, boxes, (h, w)), ours)


def test_paste_accepts_masks_without_channel_dim():
    masks = torch.rand(3, 14, 14)
    boxes = torch.tensor([[1.0, 2, 20, 30], [5.0, 5, 6, 6], [0.0, 0, 40, 40]])
    without_channel = paste_masks_in_image(masks, boxes, (32, 32))
    assert torch.equal(without_channel, paste_masks_in_image(masks[:, None], boxes, (32, 32)))


def test_paste_empty():
    out = paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (20, 30))
    assert out.shape == (0, 1, 20, 30) and out.dtype == torch.float32
    out = paste_masks_in_image(torch.rand(2, 1, 28, 28), torch.tensor([[0.0, 0, 5, 5]] * 2), (0, 30))
    assert out.shape == (2, 1, 0, 30)


def test_paste_errors():
    boxes = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="square"):
        paste_masks_in_image(torch.rand(2, 1, 14, 10), boxes, (10, 10))
    with pytest.raises(TypeError, match="floating point"):
        paste_masks_in_image(torch.ones(2, 1, 14, 14, dtype=torch.uint8), boxes, (10, 10))
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(torch.rand(2, 1, 14, 14), torch.zeros(3, 4), (10, 10))
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_image(torch.rand(2, 3, 14, 14), boxes, (10, 10))
    with pytest.raises(ValueError, match="padding"):
        paste_masks_in_image(torch.rand(2, 1, 14, 14), boxes, (10, 10), padding=-1)
    with pytest.raises(ValueError, match="image_shape"):
        paste_masks_in_image(torch.rand(2, 1, 14, 14), boxes, (10,))
