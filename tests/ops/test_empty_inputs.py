"""Edge cases that other projects' own test suites exercise (torchvision, detectron2): empty inputs."""

import pytest
import torch

from maskrcnn.ops import MultiLevelRoIAlign, batched_nms, batched_nms_limited, nms, roi_align, roi_pool
from maskrcnn.ops._backend import use_backend

BACKENDS = ["native", "torchvision"]
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _assert_empty_keep(keep, device):
    assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("boxes_shape", [(0, 4), (0,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nms_family_on_empty_input(backend, device, boxes_shape, dtype):
    boxes = torch.empty(boxes_shape, dtype=dtype, device=device)
    scores = torch.empty(0, dtype=dtype, device=device)
    idxs = torch.empty(0, dtype=torch.int64, device=device)
    _assert_empty_keep(nms(boxes, scores, 0.5), device)
    _assert_empty_keep(batched_nms(boxes, scores, idxs, 0.5), device)
    _assert_empty_keep(batched_nms_limited(boxes, scores, idxs, 0.5, 10), device)


def test_a_one_dimensional_non_empty_boxes_tensor_is_still_rejected(backend):
    with pytest.raises(ValueError, match=r"boxes must be a \(N, 4\) tensor"):
        nms(torch.zeros(4), torch.zeros(1), 0.5)
    with pytest.raises(ValueError, match=r"scores must be a \(N,\) tensor with N = 0"):
        nms(torch.zeros(0), torch.zeros(2), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooler_with_zero_images(backend, device, dtype):
    feats = [torch.rand(0, 5, 64 // k, 48 // k, dtype=dtype, device=device) for k in (1, 2, 4, 8)]
    pooler = MultiLevelRoIAlign((7, 5), SCALES, 2)
    for boxes in ([], torch.zeros(0, 5, dtype=dtype, device=device)):
        out = pooler(feats, boxes)
        assert out.shape == (0, 5, 7, 5) and out.dtype == dtype and out.device == feats[0].device
    single = MultiLevelRoIAlign(7, SCALES[:1], 2)(feats[:1], [])
    assert single.shape == (0, 5, 7, 7) and single.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooler_with_zero_boxes_keeps_dtype_and_gradient(backend, dtype):
    feats = [torch.rand(2, 5, 64 // k, 48 // k, dtype=dtype, requires_grad=True) for k in (1, 2, 4, 8)]
    out = MultiLevelRoIAlign(7, SCALES, 0)(feats, [torch.zeros(0, 4, dtype=dtype), torch.zeros(0, 4, dtype=dtype)])
    assert out.shape == (0, 5, 7, 7) and out.dtype == dtype
    out.sum().backward()
    assert all(f.grad is None or not f.grad.any() for f in feats)


def test_roi_ops_with_zero_images(backend):
    x = torch.rand(0, 3, 16, 16)
    assert roi_align(x, [], 7, 0.5, 2).shape == (0, 3, 7, 7)
    assert roi_pool(x, [], (7, 4), 0.5).shape == (0, 3, 7, 4)


def test_an_empty_box_list_for_a_non_empty_batch_is_rejected(backend):
    feats = [torch.rand(2, 3, 64 // k, 64 // k) for k in (1, 2, 4, 8)]
    with pytest.raises(ValueError, match="boxes is an empty list; pass one"):
        MultiLevelRoIAlign(7, SCALES, 2)(feats, [])
    with pytest.raises(ValueError, match="rois is an empty list; pass one"):
        roi_align(feats[0], [], 7)


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_feature_map_without_channels(op, backend):
    # torchvision returns an empty (R, 0, oh, ow) result; ours too, with an (empty) gradient for the map.
    import torchvision

    x = torch.rand(2, 0, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 4, 4.0], [1, 1, 1, 5, 5]])
    out = op(x, rois, 3)
    ref = getattr(torchvision.ops, op.__name__)(x.detach(), rois, 3)
    assert out.shape == ref.shape == (2, 0, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
