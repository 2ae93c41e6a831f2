"""``pil_bilinear_resize`` against Pillow itself (detectron2's ResizeShortestEdge resizes with
``PIL.Image.resize(..., BILINEAR)``), pixel for pixel."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskrcnn.ops.pil_resize import pil_bilinear_resize


def _pil(image: np.ndarray, size) -> np.ndarray:
    """Pillow's result for an ``(H, W, 3)`` uint8 image resized to ``size = (h, w)``."""
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _image(h, w, seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    if smooth:  # photo-like: gradients plus noise, where rounding ties are frequent
        yy, xx = np.mgrid[0:h, 0:w]
        base = (np.stack([xx * 255.0 / max(w - 1, 1), yy * 255.0 / max(h - 1, 1), (xx + yy) % 256], -1))
        return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("src, dst", [
    ((536, 559), (320, 334)),  # the fixture photos' ResizeShortestEdge sizes (downscale, antialiased)
    ((495, 750), (320, 485)),
    ((60, 80), (149, 199)),    # upscale
    ((97, 33), (41, 33)),      # one axis unchanged: Pillow skips that pass
    ((7, 5), (1, 1)),          # to a single pixel
    ((1, 1), (4, 3)),
    ((300, 200), (301, 199)),  # nearly the same size
])
@pytest.mark.parametrize("smooth", [False, True])
def test_equals_pillow(src, dst, smooth):
    image = _image(*src, seed=sum(src) + sum(dst), smooth=smooth)
    ref = _pil(image, dst)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    got = pil_bilinear_resize(chw, dst)
    assert got.dtype == torch.uint8 and got.shape == (3, *dst)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)
    # Float input holding 0..255 integers (how the model's pre-processing calls it) gives the same values.
    got_f = pil_bilinear_resize(chw.float(), dst)
    assert got_f.dtype == torch.float32 and torch.equal(got_f, got.float())


def test_torch_antialiased_interpolation_is_not_pillow():
    # Why a PIL-exact resize: torch's closest mode differs from Pillow by one level on some pixels.
    image = _image(536, 559, smooth=True)
    ref = torch.from_numpy(_pil(image, (320, 334))).permute(2, 0, 1)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    tv = F.interpolate(x, size=(320, 334), mode="bilinear", antialias=True, align_corners=False)[0]
    tv = tv.round().clamp(0, 255).to(torch.uint8)
    differ = (tv.int() - ref.int()).abs()
    assert differ.max() >= 1 and differ.ne(0).any()
    assert torch.equal(pil_bilinear_resize(torch.from_numpy(image).permute(2, 0, 1), (320, 334)), ref)


def test_pass_order_is_pillows_classic_one():
    # Pillow resizes horizontally, then vertically; Pillow 13 (python-pillow/Pillow#9549) goes vertically first for
    # some sizes where the height shrinks while the width grows or shrinks less. The passes round to 8 bits in
    # between, so the order moves some pixels by one level: the result is then equal to the vertical-first order.
    from maskrcnn.ops.pil_resize import _pass
    image = _image(300, 200, seed=3)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    ref = torch.from_numpy(_pil(image, (299, 201))).permute(2, 0, 1).int()
    got = pil_bilinear_resize(chw, (299, 201)).int()
    vertical_first = _pass(_pass(chw.int(), 300, 299, -2), 200, 201, -1)
    assert torch.equal(got, _pass(_pass(chw.int(), 200, 201, -1), 300, 299, -2))
    if not torch.equal(got, ref):  # Pillow >= 13 chose the other order here
        assert torch.equal(vertical_first, ref) and (got - ref).abs().max() == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        pil_bilinear_resize(torch.zeros(4, 4, dtype=torch.uint8), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        pil_bilinear_resize(torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 2))
    with pytest.raises(ValueError, match="empty"):
        pil_bilinear_resize(torch.zeros(3, 0, 4, dtype=torch.uint8), (2, 2))
