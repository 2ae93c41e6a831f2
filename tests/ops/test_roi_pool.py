import importlib

import pytest
import torch
import torchvision

from maskrcnn.ops._backend import use_backend
from maskrcnn.ops.roi_pool import RoIPool, roi_pool

# The module, not the function `maskrcnn.ops.roi_pool` that the package exports under the same name.
roi_pool_module = importlib.import_module("maskrcnn.ops.roi_pool")

BACKENDS = ["native", "torchvision"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _oracle(x, rois, output_size, spatial_scale):
    return torch.ops.torchvision.roi_pool(x, rois, spatial_scale, output_size[0], output_size[1])[0]


def _random_rois(num, n_images, height, width, scale, max_side, dtype=torch.float64):
    x1 = torch.rand(num, dtype=torch.float64) * (width + 6) / scale - 3 / scale
    y1 = torch.rand(num, dtype=torch.float64) * (height + 6) / scale - 3 / scale
    w = torch.rand(num, dtype=torch.float64) * (max_side + 2) / scale - 2 / scale  # some inverted
    h = torch.rand(num, dtype=torch.float64) * (max_side + 2) / scale - 2 / scale
    batch = torch.randint(0, n_images, (num,)).double()
    return torch.stack([batch, x1, y1, x1 + w, y1 + h], 1).to(dtype)


def _adversarial_rois(height, width, scale):
    h, w = height / scale, width / scale
    boxes = [
        [0, 0, 0, 0],
        [-5 * w, -5 * h, -4 * w, -4 * h],  # outside: every bin empty -> 0
        [2 * w, 0, 3 * w, h],  # outside to the right
        [-w, -h, 2 * w, 2 * h],  # huge
        [0.5 / scale, 1.5 / scale, 2.5 / scale, -0.5 / scale],  # exact halves (round away from 0), inverted
        [-0.5 / scale, -1.5 / scale, 0.5 / scale, 2.5 / scale],
        [w - 1 / scale, h - 1 / scale, w + 3 / scale, h + 3 / scale],  # partly empty bins at the far edge
    ]
    rois = torch.tensor(boxes, dtype=torch.float64)
    return torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), rois], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        (1, 3, 11, 13, 1.0, (3, 3), 14),
        (2, 2, 9, 7, 0.5, (2, 5), 12),
        (3, 2, 16, 12, 0.25, (7, 7), 20),
        (1, 2, 6, 20, 1 / 16, (1, 1), 30),
    ],
)
def test_forward_and_backward_match_torchvision(backend, ties, case):
    n, c, h, w, scale, out, max_side = case
    if ties:  # few distinct values: the first max in row-major order must win, as in torchvision
        x = torch.randint(0, 3, (n, c, h, w)).double()
    else:
        x = torch.randn(n, c, h, w, dtype=torch.float64)
    rois = torch.cat([_random_rois(30, n, h, w, scale, max_side), _adversarial_rois(h, w, scale)])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend(backend):
        ours = roi_pool(xa, rois, out, scale)
    ref = _oracle(xb, rois, out, scale)
    assert ours.shape == ref.shape == (rois.shape[0], c) + out
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_rounding_of_scaled_corners(device):
    # Corners that land on .5 after scaling in float32 must round away from zero like std::round.
    x = torch.randn(2, 4, 30, 40, device=device)
    rois = _random_rois(150, 2, 30, 40, 0.25, 25, dtype=torch.float32).to(device)
    rois[:50, 1:] = torch.round(rois[:50, 1:] * 0.5) * 2 + 2.0  # x * 0.25 = k + 0.5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_pool(xa, rois, (7, 7), 0.25)
    ref = _oracle(xb, rois, (7, 7), 0.25)
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_gradcheck_float64():
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.0, 0.0, 4.0, 5.0], [1, 1.2, 0.4, 3.6, 2.2], [1, -2.0, 3.0, 9.0, 9.0]], dtype=torch.float64
    )
    with use_backend("native"):
        assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3), 1.0), (x,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_boxes_and_empty(backend):
    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    boxes = [torch.zeros(0, 4), torch.tensor([[1.0, 1.0, 6.0, 5.0]])]
    with use_backend(backend):
        listed = roi_pool(x, boxes, 2)
        assert torch.equal(listed, roi_pool(x, torch.tensor([[1, 1.0, 1.0, 6.0, 5.0]]), 2))
        empty = roi_pool(x, torch.zeros(0, 5), (3, 2))
    assert empty.shape == (0, 3, 3, 2)
    empty.sum().backward()
    assert x.grad is None or not x.grad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_exact(dtype):
    x = torch.randn(1, 4, 9, 9).to(dtype)
    rois = torch.tensor([[0, 0.5, 1.0, 7.0, 8.5], [0, -2.0, 3.0, 4.0, 12.0]])
    x_ref = x.float().requires_grad_()
    ref = _oracle(x_ref, rois, (3, 3), 1.0)
    ref.sum().backward()
    # torchvision's CPU kernel has no float16/bfloat16: its backend runs in float32 and casts back.
    for backend in ("native", "torchvision"):
        xa = x.clone().requires_grad_()
        with use_backend(backend):
            ours = roi_pool(xa, rois, 3)
        assert ours.dtype == dtype and torch.equal(ours, ref.to(dtype))
        ours.sum().backward()
        assert xa.grad.dtype == dtype and torch.equal(xa.grad, x_ref.grad.to(dtype))


def test_channels_last_and_module():
    x = torch.randn(2, 5, 9, 11).contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[1, 0.0, 1.0, 8.0, 7.0], [0, 3.0, 3.0, 4.0, 4.0]])
    module = RoIPool((3, 2), 1.0)
    with use_backend("native"):
        out = module(x, rois)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _oracle(x.contiguous(), rois, (3, 2), 1.0))
    assert "output_size=(3, 2)" in repr(module)


def test_dispatch_follows_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(roi_pool_module, "_roi_pool_native", lambda *a: calls.append("native") or "native")
    monkeypatch.setattr(torchvision.ops, "roi_pool", lambda *a: calls.append("torchvision") or "torchvision")
    x, rois = torch.randn(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])
    with use_backend("native"):
        assert roi_pool(x, rois, 2) == "native"
    with use_backend("torchvision"):
        assert roi_pool(x, rois, 2) == "torchvision"
    assert calls == ["native", "torchvision"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rois=torch.zeros(3, 4)), "rois must be a \\(R, 5\\)"),
        (dict(rois=torch.tensor([[-1.0, 0, 0, 1, 1]])), "batch indices in \\[0, 2\\)"),
        (dict(output_size=(2, -1)), "output_size must hold positive ints"),
        (dict(input=torch.zeros(1, 4, 4)), "input must be a \\(N, C, H, W\\)"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    args = dict(input=torch.zeros(2, 1, 4, 4), rois=torch.tensor([[0.0, 0, 0, 1, 1]]), output_size=2)
    args.update(kwargs)
    with use_backend("native"), pytest.raises(ValueError, match=message):
        roi_pool(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_infinite_pixels_match_torchvision(dtype):
    # torchvision's running max starts at -FLT_MAX and takes only greater values: NaN is never the max, and a bin
    # with nothing above -FLT_MAX (all -inf; float64 values below it) returns -FLT_MAX with no gradient.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype)
    x[0, 0, :5] = -float("inf")
    x[1, 1, 2:7] = float("nan")
    x[0, 2, :, :3] = -1e39 if dtype == torch.float64 else -float("inf")
    x[1, 2, 4, 4] = float("inf")
    rois = torch.tensor([[0, 0, 0, 4, 4], [1, 1, 1, 10, 8], [0, 2, 2, 3, 3], [1, 0, 0, 10, 8], [0, 0, 0, 2, 8]],
                        dtype=dtype)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_pool(ours_x, rois, (3, 2))
    ref = _oracle(ref_x, rois, (3, 2), 1.0)
    assert torch.equal(ours, ref)
    assert (ours == -torch.finfo(torch.float32).max).any() and torch.isinf(ours).any()  # the cases are exercised
    grad = torch.randn(ours.shape, generator=g, dtype=dtype)
    ours.backward(grad)
    ref.backward(grad)
    # Equal up to the order in which bins sharing an argmax pixel sum their gradients.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=tol, atol=tol)
