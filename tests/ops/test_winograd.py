"""conv3x3_winograd against F.conv2d (float64 oracle), and the rule of winograd_applies."""
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.ops import (conv3x3_winograd, conv3x3_winograd_autograd, conv3x3_winograd_weight_grad, winograd_applies,
                          winograd_tile, winograd_weight)
from maskrcnn.ops.winograd import WINOGRAD_TILES, _transforms


def _case(n, cin, cout, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)
    bias = torch.randn(cout, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("n,cin,cout,h,w", [(1, 8, 8, 4, 4), (1, 5, 7, 9, 13), (2, 16, 4, 17, 6), (3, 3, 9, 1, 1),
                                            (1, 32, 16, 25, 34), (2, 24, 40, 30, 31)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", WINOGRAD_TILES)
def test_equals_conv2d_to_float_rounding(n, cin, cout, h, w, channels_last, tile):
    x, weight, bias = _case(n, cin, cout, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    out = conv3x3_winograd(x, winograd_weight(weight, tile), bias)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - ref).abs().max().item()
    # F(4x4, 3x3) rounds about 2 bits more than a direct convolution; far below any real difference.
    assert err < 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("tile", WINOGRAD_TILES)
def test_rounding_at_a_model_shape(tile):
    x, weight, bias = _case(1, 256, 256, 24, 28, seed=3)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    err = (conv3x3_winograd(x, winograd_weight(weight, tile), bias).double() - ref).abs().max().item()
    direct_err = (F.conv2d(x, weight, bias, padding=1).double() - ref).abs().max().item()
    # About 1e-5 of the output's scale: more than a direct convolution's rounding, far below a real difference.
    assert direct_err < err < 2e-5 * ref.abs().max().item()


@pytest.mark.parametrize("tile", WINOGRAD_TILES)
def test_relu_and_no_bias(tile):
    x, weight, _ = _case(2, 12, 6, 11, 10, seed=1)
    out = conv3x3_winograd(x, winograd_weight(weight, tile), None, relu=True)
    ref = F.conv2d(x.double(), weight.double(), padding=1).relu()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    assert (out >= 0).all()


@pytest.mark.parametrize("tile", WINOGRAD_TILES)
def test_chunks_of_tile_rows_cover_the_map(monkeypatch, tile):
    import maskrcnn.ops.winograd as wino

    # One tile row per chunk: every chunk boundary is exercised.
    monkeypatch.setattr(wino, "_CHUNK_ELEMENTS", 1)
    x, weight, bias = _case(2, 8, 8, 19, 23, seed=2)
    out = conv3x3_winograd(x, winograd_weight(weight, tile), bias)
    torch.testing.assert_close(out.double(), F.conv2d(x.double(), weight.double(), bias.double(), padding=1),
                               rtol=0, atol=2e-5)


# 21x9: 6x3 tiles, chunks of 4 tile rows (4 + 2); 7 maps of 6x5: 2x2 tiles each, chunks of 3 maps (3 + 3 + 1).
@pytest.mark.parametrize("n,h,w,tiles", [(1, 21, 9, 4 * 3), (7, 6, 5, 3 * 2 * 2)])
def test_a_short_last_chunk(monkeypatch, n, h, w, tiles):
    """Chunks of several tile rows (one image) or of several images, where the last chunk is shorter than the rest
    and takes a prefix of every buffer."""
    import maskrcnn.ops.winograd as wino

    c = 6
    monkeypatch.setattr(wino, "_CHUNK_ELEMENTS", 36 * tiles * c)
    x, weight, bias = _case(n, c, c, h, w, seed=4)
    # A strided input (a slice of a wider map), padded without F.pad.
    x = torch.cat([x, x], dim=3)[..., 1:w + 1]
    out = conv3x3_winograd(x, winograd_weight(weight), bias, relu=True)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_bad_inputs_name_the_shapes():
    x, weight, _ = _case(1, 8, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(36 or 49 or 64, 8, C_out\)"):
        conv3x3_winograd(x, winograd_weight(weight)[:, :4])
    with pytest.raises(ValueError, match=r"\(36 or 49 or 64, 8, C_out\)"):
        conv3x3_winograd(x, winograd_weight(weight)[:25])
    with pytest.raises(ValueError, match=r"tile must be one of \(4, 5, 6\), got 3"):
        winograd_weight(weight, 3)
    with pytest.raises(ValueError, match="float32"):
        conv3x3_winograd(x.bfloat16(), winograd_weight(weight))
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\)"):
        winograd_weight(torch.zeros(4, 8, 1, 1))


@pytest.mark.parametrize("tile", (2, 3) + WINOGRAD_TILES)  # 2, 3: benchmarks/winograd_precision.py
def test_transforms_compute_a_1d_correlation_exactly(tile):
    """Toom-Cook's matrices in float64: y = A^T ((G g) * (B^T d)) is the correlation of d with g, to 1e-13."""
    bt, g_t, at = _transforms(tile)
    assert bt.shape == (tile + 2, tile + 2) and g_t.shape == (tile + 2, 3) and at.shape == (tile, tile + 2)
    gen = torch.Generator().manual_seed(tile)
    g, d = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(tile + 2, generator=gen, dtype=torch.float64)
    ref = torch.stack([(g * d[i:i + 3]).sum() for i in range(tile)])
    torch.testing.assert_close(at @ ((g_t @ g) * (bt @ d)), ref, rtol=0, atol=1e-13)


def test_f4_transforms_are_lavin_and_grays():
    # Lavin & Gray's F(4x4, 3x3), as printed in their paper.
    bt, g, at = _transforms(4)
    assert bt.tolist()[:2] == [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0]]
    assert at.tolist()[3] == [0, 1, -1, 8, -8, 1]
    torch.testing.assert_close(g[3], torch.tensor([1 / 24, 1 / 12, 1 / 6], dtype=torch.float64))


@pytest.mark.parametrize("h,w,tile", [(14, 14, 5), (4, 4, 4), (8, 8, 4), (10, 10, 5), (25, 34, 5), (44, 44, 5),
                                      (32, 42, 6), (50, 68, 5), (100, 136, 6), (200, 272, 6), (18, 18, 5)])
def test_tile_rule(h, w, tile):
    # 18x18: 9 tiles of 64 would be fewest, but 6 needs 32 px a side; 8x8: 4 tiles of 36 or 4 of 49.
    assert winograd_tile(h, w) == tile


def test_applies_only_where_it_pays():
    big = torch.zeros(1, 256, 24, 30)
    w = (256, 256, 3, 3)
    assert winograd_applies(big, w)
    assert not winograd_applies(big.bfloat16(), w)
    assert not winograd_applies(torch.zeros(1, 128, 50, 50), (128, 128, 3, 3))  # too few channels
    assert winograd_applies(torch.zeros(100, 256, 14, 14), w)  # the mask head's RoI maps
    assert not winograd_applies(torch.zeros(100, 256, 7, 7), w)  # a conv box head's
    assert not winograd_applies(big, w, stride=(2, 2))
    assert not winograd_applies(big, w, dilation=(2, 2))
    assert not winograd_applies(big, w, padding=(0, 0))
    assert not winograd_applies(big, (256, 128, 3, 3), groups=2)
    assert not winograd_applies(big, (256, 256, 1, 1), padding=(0, 0))
    assert not winograd_applies(big.requires_grad_(), w)
    with torch.no_grad():
        assert winograd_applies(big, w)


@pytest.mark.parametrize("tile", WINOGRAD_TILES)
@pytest.mark.parametrize("n,cin,cout,h,w,bias", [(2, 16, 8, 13, 17, True), (1, 12, 20, 24, 28, False),
                                                 (3, 8, 12, 5, 7, True)])
def test_autograd_gradients_equal_conv2d(tile, n, cin, cout, h, w, bias):
    x, weight, b = _case(n, cin, cout, h, w, seed=5)
    b = b if bias else None
    grad_out = torch.randn(n, cout, h, w, generator=torch.Generator().manual_seed(6))
    refs = [t.double().requires_grad_() for t in (x, weight)] + ([b.double().requires_grad_()] if bias else [])
    F.conv2d(refs[0], refs[1], refs[2] if bias else None, padding=1).backward(grad_out.double())
    ours = [t.clone().requires_grad_() for t in (x, weight)] + ([b.clone().requires_grad_()] if bias else [])
    out = conv3x3_winograd_autograd(ours[0], ours[1], ours[2] if bias else None, tile)
    out.backward(grad_out)
    for name, a, r in zip(("input", "weight", "bias"), ours, refs):
        err = (a.grad.double() - r.grad).abs().max().item()
        assert a.grad.shape == r.grad.shape and err < 2e-5 * r.grad.abs().max().item(), (name, err)


def test_autograd_only_the_gradients_wanted():
    x, weight, b = _case(1, 6, 4, 9, 9, seed=7)
    w = weight.clone().requires_grad_()
    conv3x3_winograd_autograd(x, w, b).sum().backward()  # x and b want none
    wd = weight.double().requires_grad_()
    F.conv2d(x.double(), wd, b.double(), padding=1).sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=0, atol=2e-5 * wd.grad.abs().max().item())


def test_weight_grad_short_last_chunk(monkeypatch):
    import maskrcnn.ops.winograd as wino

    monkeypatch.setattr(wino, "_CHUNK_ELEMENTS", 36 * 12 * 6)
    x, weight, _ = _case(7, 6, 6, 6, 5, seed=8)
    grad_out = torch.randn(7, 6, 6, 5, generator=torch.Generator().manual_seed(9))
    wd = weight.double().requires_grad_()
    F.conv2d(x.double(), wd, padding=1).backward(grad_out.double())
    dw = conv3x3_winograd_weight_grad(x, grad_out, 4)
    torch.testing.assert_close(dw.double(), wd.grad, rtol=0, atol=2e-5 * wd.grad.abs().max().item())


def test_weight_grad_bad_inputs():
    x, _, _ = _case(1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"got torch.float32 \(1, 4, 8, 8\) and torch.float32 \(1, 4, 7, 8\)"):
        conv3x3_winograd_weight_grad(x, torch.zeros(1, 4, 7, 8))
    with pytest.raises(ValueError, match="tile must be one of"):
        conv3x3_winograd_weight_grad(x, torch.zeros(1, 4, 8, 8), tile=7)


def test_applies_with_gradients_needs_pixels_per_channel():
    w = (256, 256, 3, 3)
    x = torch.zeros(1, 256, 30, 40, requires_grad=True)  # 1200 pixels: 4.7 per channel
    assert not winograd_applies(x, w) and winograd_applies(x, w, grad=True)
    assert winograd_applies(torch.zeros(1, 256, 25, 34), w, grad=True)  # 3.3 per channel
    assert not winograd_applies(torch.zeros(2, 256, 15, 20), w, grad=True)  # 2.3
    assert not winograd_applies(torch.zeros(4, 512, 10, 15), (512, 512, 3, 3), grad=True)  # 1.2
    assert winograd_applies(torch.zeros(2, 512, 25, 34), (512, 512, 3, 3), grad=True)  # 3.3: res5 at 800 px
    # 128 channels (res3) only from 128 pixels per channel; 64 channels never.
    assert winograd_applies(torch.zeros(2, 128, 100, 136), (128, 128, 3, 3), grad=True)  # 212 per channel
    assert not winograd_applies(torch.zeros(2, 128, 100, 136), (128, 128, 3, 3))  # inference keeps 256
    assert not winograd_applies(torch.zeros(2, 128, 60, 80), (128, 128, 3, 3), grad=True)  # 75
    assert not winograd_applies(torch.zeros(2, 256, 25, 34), (128, 256, 3, 3), grad=True)  # 6.6 for 256 out
    assert winograd_applies(torch.zeros(4, 256, 100, 136), (128, 256, 3, 3), grad=True)  # 212 for 256 out
    assert not winograd_applies(torch.zeros(8, 64, 100, 136), (64, 64, 3, 3), grad=True)
