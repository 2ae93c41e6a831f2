from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper as TVLevelMapper

from maskrcnn.ops._backend import use_backend
from maskrcnn.ops.poolers import LevelMapper, MultiLevelRoIAlign
from maskrcnn.ops.roi_align import roi_align

BACKENDS = ["native", "torchvision"]
NAMES = ["p2", "p3", "p4", "p5"]
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _boxes(num, img_h, img_w, dtype=torch.float32):
    """Proposal-like boxes: log-uniform sizes from 2 to 600 px, partly outside the image."""
    side = torch.exp(torch.rand(num, 2, dtype=torch.float64) * (torch.log(torch.tensor(300.0)))) * 2
    ctr = torch.rand(num, 2, dtype=torch.float64) * torch.tensor([img_w + 40.0, img_h + 40.0]) - 20
    return torch.cat([ctr - side / 2, ctr + side / 2], 1).to(dtype)


def _pyramid(n, c, img_h, img_w, dtype=torch.float32):
    return [torch.randn(n, c, img_h // (4 * 2**i), img_w // (4 * 2**i), dtype=dtype) for i in range(4)]


def test_level_mapper_matches_torchvision():
    boxes = _boxes(500, 800, 1000)
    # Boxes whose sqrt(area) is exactly canonical_scale * 2**k sit on level boundaries.
    exact = torch.tensor([[0, 0, 224, 224], [10, 10, 122, 122], [0, 0, 448, 448], [0, 0, 56, 56], [0, 0, 0, 0]])
    boxes = torch.cat([boxes, exact.float()])
    for k_min, k_max in [(2, 5), (3, 4), (2, 2)]:
        ours = LevelMapper(k_min, k_max)(boxes)
        ref = TVLevelMapper(k_min, k_max)([boxes[:100], boxes[100:]])
        assert ours.dtype == torch.int64
        assert torch.equal(ours, ref)
        assert torch.equal(LevelMapper(k_min, k_max)([boxes[:100], boxes[100:]]), ref)
    assert LevelMapper(2, 5)(exact.float()).tolist() == [2, 1, 3, 0, 0]
    assert LevelMapper(2, 5, canonical_scale=224, canonical_level=3)(exact.float()).tolist() == [1, 0, 2, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("output_size", [7, (14, 14), (3, 5)])
def test_matches_torchvision_multiscale_roi_align(backend, sampling_ratio, output_size):
    n, img = 2, (128, 160)
    feats = _pyramid(n, 3, *img, dtype=torch.float64)
    boxes = [_boxes(40, *img, dtype=torch.float64), _boxes(25, *img, dtype=torch.float64)]
    ours_feats = [f.clone().requires_grad_() for f in feats]
    ref_feats = [f.clone().requires_grad_() for f in feats]
    pooler = MultiLevelRoIAlign(output_size, SCALES, sampling_ratio)
    with use_backend(backend):
        ours = pooler(ours_feats, boxes)
    tv = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    ref = tv(OrderedDict(zip(NAMES, ref_feats)), boxes, [img] * n)
    assert ours.shape == ref.shape == (65, 3) + pooler.output_size
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours_feats, ref_feats):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_float32_and_roi_tensor_input():
    img = (256, 320)
    feats = _pyramid(3, 4, *img)
    boxes = [_boxes(60, *img), _boxes(0, *img), _boxes(90, *img)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    pooler = MultiLevelRoIAlign((7, 7), SCALES, 2)
    ref = MultiScaleRoIAlign(NAMES, 7, 2)(OrderedDict(zip(NAMES, feats)), boxes, [img] * 3)
    with use_backend("native"):
        torch.testing.assert_close(pooler(feats, boxes), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(pooler(feats, rois), pooler(feats, boxes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_and_subset_of_levels(backend):
    # Levels P3..P5 only, aligned=True (torchvision's pooler has no `aligned`: compare per level).
    img = (256, 256)
    feats = _pyramid(1, 2, *img, dtype=torch.float64)[1:]
    big = torch.tensor([[0, 0, 500.0, 500.0], [9, 7, 300.0, 410.0]], dtype=torch.float64)  # level 5
    boxes = torch.cat([_boxes(80, *img, dtype=torch.float64), big])
    rois = torch.cat([torch.zeros(82, 1, dtype=torch.float64), boxes], 1)
    pooler = MultiLevelRoIAlign(4, SCALES[1:], 0, aligned=True)
    with use_backend(backend):
        ours = pooler(feats, rois)
    levels = LevelMapper(3, 5)(rois[:, 1:])
    assert set(levels.tolist()) == {0, 1, 2}
    for level, (f, s) in enumerate(zip(feats, SCALES[1:])):
        sel = levels == level
        ref = torch.ops.torchvision.roi_align(f, rois[sel], s, 4, 4, 0, True)
        torch.testing.assert_close(ours[sel], ref, rtol=0, atol=1e-12)


def test_single_level_is_plain_roi_align():
    x = torch.randn(2, 3, 20, 25)
    rois = torch.tensor([[0, 1.0, 2.0, 50.0, 60.0], [1, 100.0, 80.0, 300.0, 310.0], [1, 0.0, 0.0, 2.0, 2.0]])
    pooler = MultiLevelRoIAlign(7, [1 / 16], 0)
    assert torch.equal(pooler([x], rois), roi_align(x, rois, 7, 1 / 16, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_boxes(backend):
    feats = [f.requires_grad_() for f in _pyramid(2, 3, 64, 64)]
    with use_backend(backend):
        out = MultiLevelRoIAlign(7, SCALES, 2)(feats, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()


@pytest.mark.parametrize(
    "scales, message",
    [
        ([], "at least one level"),
        ([1 / 4, 1 / 16], "consecutive powers of two"),
        ([0.3, 0.15], "consecutive powers"),
        ([0.0], "positive"),
    ],
)
def test_bad_scales_raise(scales, message):
    with pytest.raises(ValueError, match=message):
        MultiLevelRoIAlign(7, scales, 2)


def test_bad_features_raise():
    pooler = MultiLevelRoIAlign(7, SCALES[:2], 2)
    rois = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="got 1 feature maps for 2 scales"):
        pooler([torch.zeros(1, 2, 8, 8)], rois)
    with pytest.raises(ValueError, match="features\\[1\\] has \\(N, C\\) = \\(1, 3\\)"):
        pooler([torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 4, 4)], rois)
    with use_backend("native"), pytest.raises(ValueError, match="boxes\\[:, 0\\] must hold integer batch indices"):
        pooler([torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4)], torch.tensor([[1, 0.0, 0.0, 10.0, 10.0]]))


def test_shared_feature_tables_pack_each_level_set_once(monkeypatch):
    import importlib

    from maskrcnn.ops.roi_align import shared_feature_tables

    ra = importlib.import_module("maskrcnn.ops.roi_align")  # the module: maskrcnn.ops.roi_align is also a function

    packs = []
    real = ra.pack_features
    monkeypatch.setattr(ra, "pack_features", lambda f, dtype, extra_rows=0: packs.append(dtype) or real(f, dtype,
                                                                                                       extra_rows))
    torch.manual_seed(0)
    feats = [torch.randn(1, 8, 64, 64), torch.randn(1, 8, 32, 32)]
    pooler = MultiLevelRoIAlign(7, [1 / 4, 1 / 8], 2)
    a = [torch.tensor([[2.0, 3.0, 40.0, 50.0], [0.0, 0.0, 250.0, 200.0]])]
    b = [torch.tensor([[10.0, 10.0, 30.0, 90.0]])]
    with use_backend("native"):
        plain = (pooler(feats, a), pooler(feats, b))
        assert len(packs) == 2  # no block: every call packs
        packs.clear()
        with shared_feature_tables():
            shared = (pooler(feats, a), pooler(feats, b))
            assert len(packs) == 1  # the second call reuses the first one's table
            half = [f.bfloat16() for f in feats]  # other tensors: a table of their own
            pooler(half, a)
            assert len(packs) == 2
            feats[0].mul_(2)  # modified in place: its version moved, so it is packed again
            doubled = pooler(feats, a)
            assert len(packs) == 3
        pooler(feats, a)
        assert len(packs) == 4  # the block's tables are gone with it
    assert all(torch.equal(p, s) for p, s in zip(plain, shared))
    assert not torch.equal(doubled, shared[0])
    # Inference tensors keep no version counter: shared by identity.
    packs.clear()
    with torch.inference_mode(), use_backend("native"), shared_feature_tables():
        frozen = [f.clone() for f in feats]
        assert torch.equal(pooler(frozen, a), pooler(feats, a)) and torch.equal(pooler(frozen, b), pooler(feats, b))
        assert len(packs) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_level_mapper_low_precision_boxes_match_torchvision(dtype):
    # A 300x300 box's area (90000) overflows float16: the level is computed on float32 areas, as torchvision does.
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 1 + torch.rand(500, 2, generator=g) * 700], 1).to(dtype)
    assert torch.equal(LevelMapper(2, 5)(boxes), TVLevelMapper(2, 5)([boxes]))
    # level floor(4 + log2(300 / 224)) = 4, index 2 of levels 2..5 (an overflowed area would give index 3)
    assert LevelMapper(2, 5)(torch.tensor([[0, 0, 300, 300.]], dtype=dtype)).item() == 2
