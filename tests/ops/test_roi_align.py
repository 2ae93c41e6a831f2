import importlib

import pytest
import torch
import torchvision

from maskrcnn.ops import _backend
from maskrcnn.ops._backend import use_backend
from maskrcnn.ops.roi_align import RoIAlign, roi_align

# The module, not the function `maskrcnn.ops.roi_align` that the package exports under the same name.
roi_align_module = importlib.import_module("maskrcnn.ops.roi_align")

BACKENDS = ["native", "torchvision"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _oracle(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    oh, ow = output_size
    return torch.ops.torchvision.roi_align(x, rois, spatial_scale, oh, ow, sampling_ratio, aligned)


def _random_rois(num, n_images, height, width, scale, max_side, dtype=torch.float64):
    """RoIs in image coordinates: partly outside the map, tiny, inverted-free and large ones mixed."""
    side = height / scale, width / scale
    x1 = torch.rand(num, dtype=torch.float64) * (side[1] + 8 / scale) - 4 / scale
    y1 = torch.rand(num, dtype=torch.float64) * (side[0] + 8 / scale) - 4 / scale
    w = torch.rand(num, dtype=torch.float64) ** 2 * max_side / scale
    h = torch.rand(num, dtype=torch.float64) ** 2 * max_side / scale
    batch = torch.randint(0, n_images, (num,)).double()
    return torch.stack([batch, x1, y1, x1 + w, y1 + h], 1).to(dtype)


def _adversarial_rois(height, width, scale):
    """Degenerate, border-straddling, exactly-on-the-edge and huge RoIs (image coordinates)."""
    h, w = height / scale, width / scale
    boxes = [
        [0, 0, 0, 0],  # zero size at the origin
        [w / 2, h / 2, w / 2, h / 2],  # zero size inside
        [w - 1 / scale, 0, w - 1 / scale, h],  # zero width
        [-1 / scale, -1 / scale, w + 1 / scale, h + 1 / scale],  # samples land exactly on -1 / H
        [-3 * w, -3 * h, -2 * w, -2 * h],  # entirely outside (top-left)
        [2 * w, 2 * h, 3 * w, 3 * h],  # entirely outside (bottom-right)
        [-w, -h, 2 * w, 2 * h],  # huge, covering the map
        [w - 0.25 / scale, h - 0.25 / scale, w + 0.5 / scale, h + 0.5 / scale],  # last pixel band
        [3, 2, 1, 5],  # inverted in x
        [1, 6, 4, 2],  # inverted in y
        [0.5, 0.25, 1.0, 0.75],  # sub-pixel
    ]
    rois = torch.tensor(boxes, dtype=torch.float64)
    return torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), rois], 1)


CASES = [
    # (N, C, H, W, spatial_scale, output_size, max_side in map pixels)
    (1, 3, 11, 13, 1.0, (3, 3), 14),
    (2, 2, 9, 7, 0.5, (2, 5), 12),
    (3, 2, 16, 12, 0.25, (7, 7), 20),
    (1, 2, 6, 20, 1 / 16, (1, 1), 30),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_torchvision(backend, aligned, sampling_ratio, case):
    n, c, h, w, scale, out, max_side = case
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    rois = torch.cat([_random_rois(25, n, h, w, scale, max_side), _adversarial_rois(h, w, scale)])
    rois[-11:, 0] = torch.randint(0, n, (11,)).double()
    inverted = (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])
    if aligned and sampling_ratio <= 0:
        # A negative adaptive grid makes torchvision's CPU kernel allocate a negative-sized vector;
        # such an RoI runs no sample, so the native result is 0 (checked below, not against it).
        if backend == "native":
            with use_backend(backend):
                assert not roi_align(x, rois[inverted], out, scale, sampling_ratio, aligned).any()
        rois = rois[~inverted]
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    with use_backend(backend):
        ours = roi_align(xa, rois, out, scale, sampling_ratio, aligned)
    ref = _oracle(xb, rois, out, scale, sampling_ratio, aligned)
    assert ours.shape == ref.shape == (rois.shape[0], c) + out
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_float32_fpn_like_sizes(device, sampling_ratio):
    # Realistic P3-sized map with proposal-like boxes (mixed slot groups in one call).
    x = torch.randn(2, 8, 50, 68, device=device)
    rois = _random_rois(200, 2, 50, 68, 0.125, 40, dtype=torch.float32).to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_align(xa, rois, (7, 7), 0.125, sampling_ratio)
    ref = _oracle(xb, rois, (7, 7), 0.125, sampling_ratio, False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio, max_side, merged", [(2, None, True), (2, 40, False), (0, 40, False)])
def test_plan_blocks_merge_when_padding_is_small_and_backward_reuses_the_plan(monkeypatch, sampling_ratio, max_side,
                                                                               merged):
    # Boxes of 6-12 map pixels at a fixed 2x2 sampling touch 2-3 rows and columns per bin: one block of the
    # largest slot counts (the padding adds under a quarter of the entries). Sizes from 0 to 40 px need from 1 to 4
    # slots per side at 2x2 and up to ~20 with adaptive sampling: exact blocks. All match torchvision forward and
    # backward, and the plan is built once per forward + backward.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 50, 68)
    if max_side is None:
        xy = torch.rand(200, 2) * torch.tensor([56.0, 38.0])
        rois = torch.cat([torch.randint(0, 2, (200, 1)).float(), xy, xy + 6 + 6 * torch.rand(200, 2)], 1) / 0.125
        rois[:, 0] *= 0.125
    else:
        rois = _random_rois(200, 2, 50, 68, 0.125, max_side, dtype=torch.float32)
    built = []
    original = roi_align_module.roi_align_plan

    def counting(*args, **kwargs):
        plan = original(*args, **kwargs)
        built.append(len(plan))
        return plan

    monkeypatch.setattr(roi_align_module, "roi_align_plan", counting)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("native"):
        ours = roi_align(xa, rois, (7, 7), 0.125, sampling_ratio)
    ref = _oracle(xb, rois, (7, 7), 0.125, sampling_ratio, False)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    assert len(built) == 1
    assert (built[0] == 1) == merged, built
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_huge_adaptive_rois_cost_at_most_the_map():
    # ceil(1000 / 2) = 500 samples per bin side: 250k samples per bin for torchvision; the native
    # slots are capped by the 12 x 10 map, so this stays instant and still matches.
    x = torch.randn(1, 2, 12, 10, dtype=torch.float64)
    rois = torch.tensor([[0, -500.0, -480.0, 500.0, 520.0], [0, 2.0, 3.0, 9.0, 11.0]], dtype=torch.float64)
    with use_backend("native"):
        ours = roi_align(x, rois, 2, 1.0, 0, False)
    torch.testing.assert_close(ours, _oracle(x, rois, (2, 2), 1.0, 0, False), rtol=0, atol=1e-12)


def test_gradcheck_float64():
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.2, 3.9], [1, -1.5, 1.0, 3.0, 7.5], [1, 2.2, 2.1, 2.4, 2.6], [0, 1.0, 1.0, 9.0, 4.0]],
        dtype=torch.float64,
    )
    with use_backend("native"):
        for sampling_ratio, aligned in [(2, False), (0, True), (-1, False)]:
            assert torch.autograd.gradcheck(
                lambda t: roi_align(t, rois, (3, 2), 1.0, sampling_ratio, aligned), (x,), fast_mode=True
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_boxes_equals_roi_tensor(backend):
    x = torch.randn(3, 4, 10, 12)
    boxes = [
        torch.tensor([[1.0, 2.0, 8.0, 9.0]]),
        torch.zeros(0, 4),
        torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 1.0, 11.0, 7.5]]),
    ]
    rois = torch.tensor([[0, 1.0, 2.0, 8.0, 9.0], [2, 0.0, 0.0, 5.0, 5.0], [2, 3.0, 1.0, 11.0, 7.5]])
    with use_backend(backend):
        assert torch.equal(roi_align(x, boxes, 4, 1.0, 2), roi_align(x, rois, 4, 1.0, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rois(backend):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with use_backend(backend):
        out = roi_align(x, torch.zeros(0, 5), (2, 3), 0.5, 2)
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert x.grad is None or not x.grad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(dtype):
    x = torch.randn(1, 4, 9, 9).to(dtype)
    rois = torch.tensor([[0, 0.5, 1.0, 7.0, 8.5], [0, -2.0, 3.0, 4.0, 12.0]])
    x_ref = x.float().requires_grad_()
    ref = _oracle(x_ref, rois, (3, 3), 1.0, 0, False)
    grad = torch.randn(ref.shape)
    ref.backward(grad.to(dtype).float())
    # torchvision's CPU kernel has no float16/bfloat16: its backend runs in float32 and casts back.
    for backend in ("native", "torchvision"):
        xa = x.clone().requires_grad_()
        with use_backend(backend):
            ours = roi_align(xa, rois, 3, 1.0, 0)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, ref.to(dtype))
        ours.backward(grad.to(dtype))
        assert xa.grad.dtype == dtype
        torch.testing.assert_close(xa.grad, x_ref.grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_added_chunk_by_chunk_in_the_features_dtype(dtype, monkeypatch):
    """With one RoI per backward chunk, a pixel read by many RoIs gets one rounded addition per chunk into its
    gradient, which is held in the features' dtype: each addition is off by at most half an ulp of the partial
    sum, so the gradient is within ``chunks * eps`` of the float32 one, relative to the sum of the absolute
    contributions (the gradient of |grad|)."""
    import importlib

    ra = importlib.import_module("maskrcnn.ops.roi_align")
    monkeypatch.setattr(ra, "_CHUNK_BYTES", 1)  # one RoI per chunk
    torch.manual_seed(0)
    x = torch.randn(1, 4, 12, 12).to(dtype)
    rois = torch.cat([torch.zeros(24, 1), torch.rand(24, 2) * 3, 8 + torch.rand(24, 2) * 3], 1)  # overlapping
    grad = torch.randn(24, 4, 3, 3)
    xa = x.clone().requires_grad_()
    with use_backend("native"):
        roi_align(xa, rois, 3, 1.0, 2).backward(grad.to(dtype))
    assert xa.grad.dtype == dtype
    x_ref = x.float().requires_grad_()
    _oracle(x_ref, rois, (3, 3), 1.0, 2, False).backward(grad.to(dtype).float())
    x_abs = x.float().requires_grad_()
    _oracle(x_abs, rois, (3, 3), 1.0, 2, False).backward(grad.to(dtype).float().abs())
    eps = torch.finfo(dtype).eps
    bound = len(rois) * eps * x_abs.grad + 1e-6
    assert bool(((xa.grad.float() - x_ref.grad).abs() <= bound).all())
    assert (xa.grad.float() - x_ref.grad).abs().max() > 0  # several roundings: not the single-chunk result


def test_channels_last_keeps_memory_format():
    x = torch.randn(2, 5, 9, 11).contiguous(memory_format=torch.channels_last).requires_grad_()
    rois = _random_rois(6, 2, 9, 11, 1.0, 8, dtype=torch.float32)
    with use_backend("native"):
        out = roi_align(x, rois, 3, 1.0, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _oracle(x.contiguous(), rois, (3, 3), 1.0, 2, False))
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_module_matches_function_and_repr():
    x = torch.randn(1, 3, 10, 10)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 6.0]])
    module = RoIAlign((2, 3), 0.5, 2, aligned=True)
    assert torch.equal(module(x, rois), roi_align(x, rois, (2, 3), 0.5, 2, True))
    assert "output_size=(2, 3)" in repr(module) and "aligned=True" in repr(module)


def test_dispatch_follows_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(roi_align_module, "_roi_align_native", lambda *a: calls.append("native") or "native")
    monkeypatch.setattr(torchvision.ops, "roi_align", lambda *a: calls.append("torchvision") or "torchvision")
    x, rois = torch.randn(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]])
    with use_backend("native"):
        assert roi_align(x, rois, 2) == "native"
    with use_backend("torchvision"):
        assert roi_align(x, rois, 2) == "torchvision"
    with use_backend("auto"):
        assert roi_align(x, rois, 2) == _backend.resolve("roi_align")
    assert len(calls) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rois=torch.zeros(3, 4)), "rois must be a \\(R, 5\\)"),
        (dict(rois=[torch.zeros(2, 5)]), "rois\\[0\\] must be a \\(Ri, 4\\)"),
        (dict(rois=torch.tensor([[2.0, 0, 0, 1, 1]])), "batch indices in \\[0, 2\\)"),
        (dict(rois=torch.tensor([[0.5, 0, 0, 1, 1]])), "batch indices"),
        (dict(output_size=0), "output_size must hold positive ints"),
        (dict(output_size=(2, 2, 2)), "output_size must be an int or a pair"),
        (dict(sampling_ratio=1.5), "sampling_ratio must be an int"),
        (dict(input=torch.zeros(2, 3, 4)), "input must be a \\(N, C, H, W\\)"),
        (dict(input=torch.zeros(2, 1, 4, 4, dtype=torch.int64)), "floating point"),
        (dict(input=torch.zeros(2, 1, 0, 4)), "non-empty spatial dims"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    args = dict(input=torch.zeros(2, 1, 4, 4), rois=torch.tensor([[0.0, 0, 0, 1, 1]]), output_size=2, sampling_ratio=2)
    args.update(kwargs)
    with use_backend("native"), pytest.raises(ValueError, match=message):
        roi_align(**args)
