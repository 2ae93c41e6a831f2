"""The native ops on CUDA against torchvision's CUDA kernels (nms, batched_nms, roi_align, roi_pool), forward and
backward, float32 at detector sizes and float16 inputs (computed in float32 like the CPU path).

Skipped on machines without a visible CUDA device; the CPU tests next to this file compare the same ops on the
CPU."""
import pytest
import torch
import torchvision

from maskrcnn.ops._backend import use_backend
from maskrcnn.ops.nms import batched_nms, nms
from maskrcnn.ops.roi_align import roi_align
from maskrcnn.ops.roi_pool import roi_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA test: torch.cuda.is_available() is False (no GPU visible)")


def _boxes(num, size, gen, device, dtype=torch.float32):
    """Proposal-like boxes ``(num, 4)`` xyxy in a ``size`` x ``size`` image, many overlapping (clusters)."""
    centres = torch.rand(num // 8 + 1, 2, generator=gen) * size
    c = centres[torch.randint(0, len(centres), (num,), generator=gen)] + torch.randn(num, 2, generator=gen) * 6
    wh = torch.rand(num, 2, generator=gen) * size / 4 + 4
    return torch.cat([c - wh / 2, c + wh / 2], 1).to(device=device, dtype=dtype)


def _rois(num, n_images, height, width, scale, gen, device):
    xy = torch.rand(num, 2, generator=gen) * torch.tensor([width, height]) / scale
    wh = torch.rand(num, 2, generator=gen) * 40 / scale
    idx = torch.randint(0, n_images, (num, 1), generator=gen).float()
    return torch.cat([idx, xy, xy + wh], 1).to(device)


@pytest.mark.parametrize("num", [100, 2000])
def test_nms_matches_torchvision_cuda(num):
    gen = torch.Generator().manual_seed(num)
    boxes = _boxes(num, 800, gen, "cuda")
    scores = torch.rand(num, generator=gen).to("cuda")
    idxs = torch.randint(0, 5, (num,), generator=gen).to("cuda")
    with use_backend("native"):
        keep = nms(boxes, scores, 0.7)
        keep_b = batched_nms(boxes, scores, idxs, 0.5)
    assert keep.is_cuda and keep_b.is_cuda
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.7))
    assert torch.equal(keep_b, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    # the CUDA result is the CPU result
    with use_backend("native"):
        assert torch.equal(keep.cpu(), nms(boxes.cpu(), scores.cpu(), 0.7))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_torchvision_cuda(aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 50, 68, generator=gen).cuda()
    rois = _rois(300, 2, 50, 68, 0.125, gen, "cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_align(xa, rois, (7, 7), 0.125, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(xb, rois, (7, 7), 0.125, sampling_ratio, aligned)
    assert ours.is_cuda and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=gen).cuda()
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


def test_roi_align_float16_on_cuda_is_computed_in_float32():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 40, 40, generator=gen).cuda().half()
    rois = _rois(100, 1, 40, 40, 0.25, gen, "cuda")
    with use_backend("native"):
        ours = roi_align(x, rois, (14, 14), 0.25, 2, True)
    ref = torchvision.ops.roi_align(x.float(), rois, (14, 14), 0.25, 2, True)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.float(), ref, rtol=1e-3, atol=1e-3)  # one rounding to float16 at the end


def test_roi_pool_matches_torchvision_cuda():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 50, 68, generator=gen).cuda()
    rois = _rois(300, 2, 50, 68, 0.125, gen, "cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_pool(xa, rois, (7, 7), 0.125)
    ref = torchvision.ops.roi_pool(xb, rois, (7, 7), 0.125)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # a max: exact
    grad = torch.randn(ref.shape, generator=gen).cuda()
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
