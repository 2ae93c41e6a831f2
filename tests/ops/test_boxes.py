import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops._utils import convert_boxes_to_roi_format

from maskrcnn.ops.boxes import (
    box_area,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    boxes_to_rois,
    clip_boxes_to_image,
    remove_small_boxes,
)

DTYPES = [torch.float32, torch.float64]


def _random_boxes(n, dtype=torch.float32, size=800.0, max_wh=200.0):
    xy = torch.rand(n, 2, dtype=torch.float64) * size
    wh = torch.rand(n, 2, dtype=torch.float64) * max_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _adversarial_boxes(dtype):
    """Boxes over the image border, zero-area (points and lines), identical, nested and huge."""
    boxes = torch.tensor(
        [
            [-50.0, -20.0, 30.0, 40.0],
            [790.0, 590.0, 900.0, 700.0],
            [10.0, 10.0, 10.0, 10.0],
            [10.0, 10.0, 10.0, 50.0],
            [10.0, 10.0, 60.0, 10.0],
            [0.0, 0.0, 100.0, 100.0],
            [0.0, 0.0, 100.0, 100.0],
            [25.0, 25.0, 75.0, 75.0],
            [-1e5, -1e5, 1e5, 1e5],
            [0.5, 0.25, 0.75, 99.5],
            [100.0, 100.0, 200.0, 200.0],
        ],
        dtype=dtype,
    )
    return torch.cat([boxes, _random_boxes(20, dtype, size=200.0)])


def _detectron_overlaps(a, b):
    """Detectron's +1 pixel IoU (utils/cython_bbox.pyx), straight loops in float64."""
    a, b = a.double().numpy(), b.double().numpy()
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = min(p[2], q[2]) - max(p[0], q[0]) + 1
            ih = min(p[3], q[3]) - max(p[1], q[1]) + 1
            if iw > 0 and ih > 0:
                union = (p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - iw * ih
                out[i, j] = iw * ih / union
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_area_matches_torchvision(dtype):
    for boxes in (_random_boxes(50, dtype), _adversarial_boxes(dtype), torch.zeros((0, 4), dtype=dtype)):
        ours = box_area(boxes)
        assert ours.dtype == dtype
        assert torch.equal(ours, torchvision.ops.box_area(boxes))


def test_box_area_upcasts_half_and_supports_batches():
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 1000.0]], dtype=torch.float16)
    area = box_area(boxes)
    assert area.dtype == torch.float32 and area.item() == 1e6  # 1e6 overflows float16
    batched = _random_boxes(12).view(3, 4, 4)
    assert torch.equal(box_area(batched), box_area(batched.view(12, 4)).view(3, 4))


def test_box_area_legacy_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 4.0], [3.0, 3.0, 3.0, 3.0]])
    assert box_area(boxes, legacy_plus_one=True).tolist() == [50.0, 1.0]
    assert box_area(boxes).tolist() == [36.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_iou_matches_torchvision(dtype):
    cases = [
        (_random_boxes(40, dtype), _random_boxes(70, dtype)),
        (_adversarial_boxes(dtype), _adversarial_boxes(dtype)),
        (_adversarial_boxes(dtype), torch.zeros((0, 4), dtype=dtype)),
        (torch.zeros((0, 4), dtype=dtype), _random_boxes(3, dtype)),
    ]
    for a, b in cases:
        ours = box_iou(a, b)
        assert ours.shape == (a.shape[0], b.shape[0]) and ours.dtype == dtype
        # Two identical points give 0/0 = nan in both; everything else must agree bit for bit.
        torch.testing.assert_close(ours, torchvision.ops.box_iou(a, b), rtol=0, atol=0, equal_nan=True)


def test_box_iou_values_and_batch_dims():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    assert box_iou(a.double(), b.double()).tolist() == [[50.0 / 150.0, 0.0, 1.0]]
    x, y = _random_boxes(10).view(2, 5, 4), _random_boxes(14).view(2, 7, 4)
    batched = box_iou(x, y)
    assert batched.shape == (2, 5, 7)
    assert torch.equal(batched[1], box_iou(x[1], y[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_iou_legacy_plus_one_matches_detectron(dtype):
    a = _adversarial_boxes(dtype).round()
    b = torch.cat([a[:8], _random_boxes(15, dtype, size=150.0).round()])
    ours = box_iou(a, b, legacy_plus_one=True)
    torch.testing.assert_close(ours.double(), _detectron_overlaps(a, b), rtol=1e-6, atol=1e-12)
    # Detectron's convention makes a single-pixel box a unit square, hence IoU 1 with itself.
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]], dtype=dtype)
    assert box_iou(point, point, legacy_plus_one=True).item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_boxes_matches_torchvision(dtype):
    boxes = _adversarial_boxes(dtype) - 100
    for shape in [(24, 4), (12, 8), (3, 8, 4)]:
        b = boxes[:24].reshape(shape)
        ours = clip_boxes_to_image(b, (480, 640))
        assert ours.shape == b.shape and ours.dtype == dtype
        assert torch.equal(ours, torchvision.ops.clip_boxes_to_image(b, (480, 640)))


def test_clip_boxes_puts_width_on_x_and_height_on_y():
    boxes = torch.tensor([[-5.0, -5.0, 1000.0, 1000.0, 10.0, 20.0, 30.0, 40.0]])
    assert clip_boxes_to_image(boxes, (100, 200)).tolist() == [[0.0, 0.0, 200.0, 100.0, 10.0, 20.0, 30.0, 40.0]]
    assert clip_boxes_to_image(boxes, torch.Size([100, 200]), legacy_plus_one=True).tolist() == [
        [0.0, 0.0, 199.0, 99.0, 10.0, 20.0, 30.0, 40.0]
    ]


def test_clip_boxes_gradient_flows_through_unclipped_coordinates():
    boxes = torch.tensor([[-5.0, 5.0, 50.0, 500.0]], requires_grad=True)
    clip_boxes_to_image(boxes, (100, 100)).sum().backward()
    assert boxes.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_small_boxes_matches_torchvision(dtype):
    boxes = torch.cat([_adversarial_boxes(dtype), _random_boxes(100, dtype, max_wh=20.0)])
    for min_size in [0.0, 1e-3, 1.0, 5.0, 15.0]:
        ours = remove_small_boxes(boxes, min_size)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, torchvision.ops.remove_small_boxes(boxes, min_size))
    assert remove_small_boxes(torch.zeros((0, 4), dtype=dtype), 1.0).shape == (0,)


def test_remove_small_boxes_legacy_plus_one():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 3.0, 9.0], [2.0, 2.0, 2.0, 2.0]])
    assert remove_small_boxes(boxes, 5.0, legacy_plus_one=True).tolist() == [0]
    assert remove_small_boxes(boxes, 1.0, legacy_plus_one=True).tolist() == [0, 1, 2]
    assert remove_small_boxes(boxes, 4.0).tolist() == [0]


def test_remove_small_boxes_strict():
    # detectron2's Boxes.nonempty(threshold): sides must be > the threshold, so 0 drops empty boxes.
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 9.0], [2.0, 2.0, 5.0, 2.0], [1.0, 1.0, 3.0, 4.0]])
    assert remove_small_boxes(boxes, 0.0).tolist() == [0, 1, 2, 3]
    assert remove_small_boxes(boxes, 0.0, strict=True).tolist() == [0, 3]
    assert remove_small_boxes(boxes, 2.0).tolist() == [0, 3]
    assert remove_small_boxes(boxes, 2.0, strict=True).tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_format_conversions_match_torchvision(dtype):
    boxes = _adversarial_boxes(dtype)
    xywh = box_xyxy_to_xywh(boxes)
    assert torch.equal(xywh, torchvision.ops.box_convert(boxes, "xyxy", "xywh"))
    assert torch.equal(box_xywh_to_xyxy(xywh), torchvision.ops.box_convert(xywh, "xywh", "xyxy"))
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), boxes)
    assert box_xyxy_to_xywh(boxes.view(1, -1, 4)).shape == (1, boxes.shape[0], 4)
    assert box_xyxy_to_xywh(torch.zeros((0, 4), dtype=dtype)).shape == (0, 4)


def test_boxes_to_rois_matches_torchvision():
    per_image = [_random_boxes(3), torch.zeros((0, 4)), _random_boxes(5)]
    rois = boxes_to_rois(per_image)
    assert rois.shape == (8, 5) and rois.dtype == torch.float32
    assert torch.equal(rois, convert_boxes_to_roi_format(per_image))
    assert rois[:, 0].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert boxes_to_rois([torch.zeros((0, 4), dtype=torch.float64)]).dtype == torch.float64
    empty = boxes_to_rois([])
    assert empty.shape == (0, 5)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="boxes1 must have last dimension 4"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        clip_boxes_to_image(torch.zeros(3, 6), (10, 10))
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        clip_boxes_to_image(torch.zeros(3, 4), (10, 10, 3))
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        remove_small_boxes(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        boxes_to_rois([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(TypeError, match="list of"):
        boxes_to_rois(torch.zeros(2, 4))


def test_flip_boxes_continuous_and_legacy_and_involution():
    from maskrcnn.ops.boxes import flip_boxes

    b = torch.tensor([[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 10.0, 5.0]])
    torch.testing.assert_close(flip_boxes(b, 10), torch.tensor([[6.0, 2.0, 9.0, 6.0], [0.0, 0.0, 10.0, 5.0]]))
    # Detectron: x -> W - 1 - x (pixel-inclusive coordinates).
    torch.testing.assert_close(flip_boxes(b, 10, legacy_plus_one=True),
                               torch.tensor([[5.0, 2.0, 8.0, 6.0], [-1.0, 0.0, 9.0, 5.0]]))
    per_class = torch.cat([b, b + 1], 1)  # (N, 8): every block flipped
    torch.testing.assert_close(flip_boxes(per_class, 10)[:, 4:], flip_boxes(b + 1, 10))
    assert torch.equal(flip_boxes(flip_boxes(b, 37), 37), b)  # integer coordinates: exact
    with pytest.raises(ValueError, match="multiple of 4"):
        flip_boxes(torch.zeros(2, 3), 10)


def test_clip_gradient_on_the_bound_matches_torchvision():
    # A coordinate exactly on a bound gets no gradient (torchvision's clamp), one inside gets all of it.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, 5.0, 11.0, 9.5]])
    ours, ref = boxes.clone().requires_grad_(), boxes.clone().requires_grad_()
    clip_boxes_to_image(ours, (10, 10)).sum().backward()
    torchvision.ops.clip_boxes_to_image(ref, (10, 10)).sum().backward()
    assert torch.equal(ours.grad, ref.grad)
    assert ours.grad.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]


def test_clip_keeps_nan_as_torchvision():
    boxes = torch.tensor([[float("nan"), 1.0, 50.0, float("nan")]])
    ours = clip_boxes_to_image(boxes, (10, 20))
    assert torch.equal(ours.isnan(), torchvision.ops.clip_boxes_to_image(boxes, (10, 20)).isnan())
    assert ours[0, 1:3].tolist() == [1.0, 20.0]
