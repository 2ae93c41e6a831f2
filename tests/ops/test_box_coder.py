import math

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from maskrcnn.ops.box_coder import BoxCoder

DTYPES = [torch.float32, torch.float64]
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0)]


def _random_boxes(n, dtype=torch.float32, size=800.0, min_wh=1.0, max_wh=300.0):
    xy = torch.rand(n, 2, dtype=torch.float64) * size - 50
    wh = torch.rand(n, 2, dtype=torch.float64) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def _detectron_encode(boxes, gt, weights):
    """Detectron utils/boxes.py bbox_transform_inv (+1 widths), float64 numpy."""
    boxes, gt = boxes.double().numpy(), gt.double().numpy()
    wx, wy, ww, wh = weights
    ew, eh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    ex, ey = boxes[:, 0] + 0.5 * ew, boxes[:, 1] + 0.5 * eh
    gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    out = np.stack([wx * (gx - ex) / ew, wy * (gy - ey) / eh, ww * np.log(gw / ew), wh * np.log(gh / eh)], 1)
    return torch.from_numpy(out)


def _detectron_decode(boxes, deltas, weights, clip):
    """Detectron utils/boxes.py bbox_transform (+1 widths, x2 = ctr + w/2 - 1), float64 numpy."""
    boxes, deltas = boxes.double().numpy(), deltas.double().numpy()
    wx, wy, ww, wh = weights
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = np.minimum(deltas[:, 2::4] / ww, clip), np.minimum(deltas[:, 3::4] / wh, clip)
    px, py = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
    out = np.zeros(deltas.shape)
    out[:, 0::4], out[:, 1::4] = px - 0.5 * pw, py - 0.5 * ph
    out[:, 2::4], out[:, 3::4] = px + 0.5 * pw - 1, py + 0.5 * ph - 1
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision_bitwise(dtype, weights):
    proposals = _random_boxes(300, dtype)
    gt = torch.cat([_random_boxes(290, dtype), proposals[290:]])  # identical pairs encode to exact zeros
    ours = BoxCoder(weights).encode(gt, proposals)
    expected = TVBoxCoder(weights).encode_single(gt, proposals)
    assert ours.dtype == dtype and ours.shape == (300, 4)
    assert torch.equal(ours, expected)
    assert torch.equal(ours[-10:], torch.zeros(10, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("num_classes", [1, 81])
def test_decode_matches_torchvision_bitwise(dtype, weights, num_classes):
    boxes = _random_boxes(200, dtype)
    deltas = torch.randn(200, 4 * num_classes, dtype=dtype) * 2
    deltas[:5, 2::4] = 50.0  # far past bbox_xform_clip: exp must be clipped identically
    deltas[5:10, 3::4] = -50.0
    coder = BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    ours = coder.decode(deltas, boxes)
    expected = TVBoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16)).decode_single(deltas, boxes)
    assert ours.dtype == dtype and ours.shape == (200, 4 * num_classes)
    assert torch.equal(ours, expected)
    assert torch.isfinite(ours).all()


def test_decode_clips_dw_dh_before_exp():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    decoded = BoxCoder(bbox_xform_clip=math.log(4.0)).decode(torch.tensor([[0.0, 0.0, 9.0, 9.0]]), boxes)
    torch.testing.assert_close(decoded, torch.tensor([[-15.0, -30.0, 25.0, 50.0]]))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_decode_upcasts_half_precision_deltas(half):
    boxes = _random_boxes(50) + 500  # coordinates where half precision steps are whole pixels
    deltas = (torch.randn(50, 8) * 0.5).to(half)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ours = coder.decode(deltas, boxes)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, TVBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas.float(), boxes))
    # The float32 boxes are not representable in half precision, so matching the float32 oracle
    # above also shows that they were not rounded to the deltas' dtype.
    assert not torch.equal(boxes.to(half).float(), boxes)


def test_encode_upcasts_half_precision_inputs():
    gt, proposals = _random_boxes(20), _random_boxes(20)
    ours = BoxCoder().encode(gt.to(torch.bfloat16), proposals.to(torch.bfloat16))
    assert ours.dtype == torch.float32
    gt, proposals = gt.to(torch.bfloat16).float(), proposals.to(torch.bfloat16).float()
    expected = TVBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, proposals)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_roundtrip(legacy, weights):
    proposals = _random_boxes(100, torch.float64)
    gt = _random_boxes(100, torch.float64)
    coder = BoxCoder(weights, bbox_xform_clip=1e9, legacy_plus_one=legacy)
    torch.testing.assert_close(coder.decode(coder.encode(gt, proposals), proposals), gt, rtol=0, atol=1e-9)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_legacy_plus_one_matches_detectron(weights):
    proposals = _random_boxes(100, torch.float64).round()
    gt = _random_boxes(100, torch.float64).round()
    coder = BoxCoder(weights, legacy_plus_one=True)
    torch.testing.assert_close(coder.encode(gt, proposals), _detectron_encode(proposals, gt, weights))
    deltas = torch.randn(100, 12, dtype=torch.float64)
    deltas[:3, 2] = 20.0
    expected = _detectron_decode(proposals, deltas, weights, math.log(1000.0 / 16))
    torch.testing.assert_close(coder.decode(deltas, proposals), expected)
    # The conventions differ, so the test above can tell them apart.
    assert not torch.allclose(BoxCoder(weights).decode(deltas, proposals), expected)


def test_legacy_zero_deltas_give_back_the_box():
    boxes = torch.tensor([[10.0, 20.0, 29.0, 59.0]])
    assert torch.equal(BoxCoder(legacy_plus_one=True).decode(torch.zeros(1, 4), boxes), boxes)
    assert torch.equal(BoxCoder().decode(torch.zeros(1, 4), boxes), boxes)


def test_empty_inputs():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    decoded = coder.decode(torch.zeros(0, 324), torch.zeros(0, 4))
    assert decoded.shape == (0, 324) and decoded.dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="weights must have 4 elements"):
        BoxCoder((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights must be positive"):
        BoxCoder((1.0, 0.0, 1.0, 1.0))
    coder = BoxCoder()
    with pytest.raises(ValueError, match=r"deltas must be \(N, 4K\)"):
        coder.decode(torch.zeros(3, 6), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="deltas has 3 rows but boxes has 2"):
        coder.decode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"proposals must be \(N, 4\)"):
        coder.encode(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="pair up row by row"):
        coder.encode(torch.zeros(3, 4), torch.zeros(2, 4))
