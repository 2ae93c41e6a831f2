import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.rpn.anchors import (AnchorGenerator, detectron2_cell_anchors, detectron_cell_anchors,
                                          torchvision_cell_anchors)

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5


def _detectron_reference(stride, sizes, ratios):
    """Detectron's generate_anchors written out step by step in NumPy (independent of the code under test)."""
    out = []
    base_w = base_h = float(stride)
    ctr = 0.5 * (stride - 1)
    for r in ratios:
        w = np.round(np.sqrt(base_w * base_h / r))
        h = np.round(w * r)
        for s in sizes:
            sw, sh = w * s / stride, h * s / stride
            out.append([ctr - 0.5 * (sw - 1), ctr - 0.5 * (sh - 1), ctr + 0.5 * (sw - 1), ctr + 0.5 * (sh - 1)])
    return np.array(out)


def test_torchvision_cell_anchors_hand_computed():
    # size 32, ratio 0.5: h = 32 * sqrt(.5) = 22.63, w = 32 / sqrt(.5) = 45.25 -> round(+-w/2, +-h/2)
    a = torchvision_cell_anchors((32,), (0.5, 1.0, 2.0))
    assert a.tolist() == [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    assert torch.equal(a, TVAnchorGenerator().generate_anchors([32], [0.5, 1.0, 2.0]))


def test_detectron_published_anchors():
    # py-faster-rcnn / Detectron generate_anchors.py lists the anchors of stride 16, sizes 128..512 as computed
    # by the original MATLAB code (1-based pixel indices); the Python version is that table minus one.
    matlab = [[-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
              [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
              [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]]
    got = detectron_cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0))
    assert got.dtype == torch.float32
    assert got.tolist() == (np.array(matlab) - 1).tolist()


def test_detectron_default_c4_anchors_hand_computed():
    got = detectron_cell_anchors(16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert got.shape == (15, 4)
    # ratio 0.5: w = round(sqrt(256 / 0.5)) = 23, h = round(11.5) = 12 (half to even); size 32 -> 46 x 24 about
    # the centre 7.5. Ratio 1, size 32: 32 x 32. Ratio 2: w = round(sqrt(128)) = 11, h = 22; size 32 -> 22 x 44.
    assert got[0].tolist() == [-15, -4, 30, 19]
    assert got[5].tolist() == [-8, -8, 23, 23]
    assert got[10].tolist() == [-3, -14, 18, 29]
    np.testing.assert_array_equal(got.numpy(), _detectron_reference(16, (32, 64, 128, 256, 512), (0.5, 1, 2)))
    # FPN level 2 (stride 4, size 32): ratio rounding on a 4x4 base (w = round(sqrt(32)) = 6, h = 3 for r=0.5).
    np.testing.assert_array_equal(detectron_cell_anchors(4, (32,), (0.5, 1.0, 2.0)).numpy(),
                                  _detectron_reference(4, (32,), (0.5, 1.0, 2.0)))


def test_legacy_grid_is_location_major():
    gen = AnchorGenerator([(32, 64)], [(0.5, 1.0, 2.0)], strides=[16], legacy_plus_one=True)
    assert gen.num_anchors_per_location() == [6]
    a = gen([torch.zeros(1, 4, 2, 3)])[0]
    assert a.shape == (2 * 3 * 6, 4)
    cell = torch.from_numpy(_detectron_reference(16, (32, 64), (0.5, 1.0, 2.0))).float()
    for y in range(2):
        for x in range(3):
            loc = (y * 3 + x) * 6
            assert torch.equal(a[loc:loc + 6], cell + torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y]))


@pytest.mark.parametrize("batch", [(1, 3, 128, 160), (2, 3, 96, 224), (1, 3, 800 // 8, 1216 // 8)])
def test_fpn_anchors_equal_torchvision_with_inferred_strides(batch):
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS, strides=None)
    tv = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)
    h, w = batch[-2:]
    # P6 is a stride-2 max-pool of P5: ceil sizes, so its inferred stride is not always 64.
    feats = [torch.zeros(batch[0], 2, math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32, 64)]
    got = ours(feats, batch_shape=(h, w))
    assert [g.shape[0] for g in got] == [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    ref = tv(TVImageList(torch.zeros(batch), [(h, w)] * batch[0]), feats)
    for r in ref:
        assert torch.equal(torch.cat(got), r)


def test_single_level_and_explicit_strides_equal_torchvision():
    sizes, ratios = ((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)
    ours = AnchorGenerator(sizes, ratios, strides=[16])
    tv = TVAnchorGenerator(sizes, ratios)
    feat = torch.zeros(1, 2, 5, 7)
    got = ours([feat])[0]
    assert got.shape == (5 * 7 * 15, 4)
    assert torch.equal(got, tv(TVImageList(torch.zeros(1, 3, 80, 112), [(80, 112)]), [feat])[0])
    # the next location along x is the same cell shifted by one stride
    assert torch.equal(got[15] - got[0], torch.tensor([16.0, 0, 16, 0]))
    assert torch.equal(got[7 * 15] - got[0], torch.tensor([0.0, 16, 0, 16]))


def test_flat_arguments_follow_torchvision():
    ours = AnchorGenerator((32, 64), (0.5, 1.0, 2.0), strides=(8, 16))
    assert ours.sizes == [(32.0,), (64.0,)] and ours.aspect_ratios == [(0.5, 1.0, 2.0)] * 2
    assert ours.num_anchors_per_location() == TVAnchorGenerator((32, 64), (0.5, 1.0, 2.0)).num_anchors_per_location()


def test_cache_dtype_and_device():
    gen = AnchorGenerator(FPN_SIZES[:2], FPN_RATIOS[:2], strides=[4, 8])
    feats = [torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4)]
    a = gen(feats)
    b = gen(feats)
    assert all(x is y for x, y in zip(a, b))  # cached per (level, grid, stride, device, dtype)
    assert gen([f.half() for f in feats])[0].dtype == torch.float32  # fp16 cannot hold pixel coordinates
    d = gen([f.double() for f in feats])
    assert d[0].dtype == torch.float64 and torch.equal(d[0].float(), a[0])
    c = gen([torch.zeros(1, 2, 9, 8), torch.zeros(1, 2, 4, 4)])
    assert c[0].shape[0] == 9 * 8 * 3 and c[1] is a[1]


def test_from_cfg_single_level():
    cfg = get_cfg()
    assert_and_infer_cfg(cfg, make_immutable=False)
    gen = AnchorGenerator.from_cfg(cfg)
    assert gen.num_anchors_per_location() == [15] and gen.strides == [16] and not gen.legacy_plus_one
    assert gen.sizes == [(32.0, 64.0, 128.0, 256.0, 512.0)] and gen.aspect_ratios == [(0.5, 1.0, 2.0)]
    # a conv5 body (one scale of 1/32) moves the stride
    assert AnchorGenerator.from_cfg(cfg, spatial_scales=[1.0 / 32]).strides == [32]
    cfg.MODEL.LEGACY_PLUS_ONE = True
    gen = AnchorGenerator.from_cfg(cfg)
    assert gen.legacy_plus_one and gen.cell_anchors[0][5].tolist() == [-8, -8, 23, 23]


def _fpn_cfg(*extra):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FAST_RCNN.ROI_BOX_HEAD",
                         "fast_rcnn_heads.roi_2mlp_head", "MRCNN.ROI_MASK_HEAD",
                         "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs", *extra])
    assert_and_infer_cfg(cfg, make_immutable=False)
    return cfg


def test_from_cfg_fpn():
    gen = AnchorGenerator.from_cfg(_fpn_cfg("FPN.RPN_ANCHOR_START_SIZE", "16", "FPN.RPN_MAX_LEVEL", "5"))
    assert gen.strides == [4, 8, 16, 32] and gen.sizes == [(16.0,), (32.0,), (64.0,), (128.0,)]
    assert gen.num_anchors_per_location() == [3] * 4
    gen = AnchorGenerator.from_cfg(_fpn_cfg("MODEL.LEGACY_PLUS_ONE", "True"))
    assert gen.strides == [4, 8, 16, 32, 64] and gen.legacy_plus_one
    assert gen.cell_anchors[0][1].tolist() == [-14, -14, 17, 17]  # 32x32 about (4 - 1) / 2 = 1.5
    assert AnchorGenerator.from_cfg(_fpn_cfg("FPN.RPN_ANCHOR_STRIDES_FROM_SIZE", "True")).strides is None
    with pytest.raises(ValueError, match="LEGACY_PLUS_ONE"):
        AnchorGenerator.from_cfg(_fpn_cfg("FPN.RPN_ANCHOR_STRIDES_FROM_SIZE", "True", "MODEL.LEGACY_PLUS_ONE", "True"))
    with pytest.raises(ValueError, match="MULTILEVEL_RPN"):
        AnchorGenerator.from_cfg(_fpn_cfg("FPN.MULTILEVEL_RPN", "False"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator([(32,), (64,)], [(1.0,), (1.0,), (1.0,)])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator([(32,), (64,)], [(1.0,)] * 2, strides=[4])
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator([(32,)], [(1.0,)], strides=[0])
    with pytest.raises(ValueError, match="sizes\\[0\\]"):
        AnchorGenerator([(-32,)], [(1.0,)])
    with pytest.raises(ValueError, match="aspect_ratios\\[0\\]"):
        AnchorGenerator([(32,)], [()])
    with pytest.raises(ValueError, match="explicit strides"):
        AnchorGenerator([(32,)], [(1.0,)], None, legacy_plus_one=True)
    with pytest.raises(ValueError, match="batch_shape"):
        AnchorGenerator([(32,)], [(1.0,)])([torch.zeros(1, 1, 4, 4)])
    with pytest.raises(ValueError, match="2 feature levels"):
        AnchorGenerator([(32,)], [(1.0,)], strides=[4])([torch.zeros(1, 1, 4, 4)] * 2)


def _detectron2_reference(stride, sizes, ratios, grid):
    """detectron2's DefaultAnchorGenerator (generate_cell_anchors, _create_grid_offsets with OFFSET 0, grid_anchors)
    written out: cell anchors size-major in Python floats, then float32; float32 shifts ``arange(0, W * stride,
    stride)``; anchors location-major."""
    cell = []
    for size in sizes:
        for r in ratios:
            w = math.sqrt(size ** 2.0 / r)
            h = r * w
            cell.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    cell = torch.tensor(cell)
    sx = torch.arange(0.0, grid[1] * stride, step=stride, dtype=torch.float32)
    sy = torch.arange(0.0, grid[0] * stride, step=stride, dtype=torch.float32)
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack((xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4), cell


def test_detectron2_cell_anchors_hand_computed():
    # size 32, ratio 0.5: w = sqrt(1024 / 0.5) = 45.2548, h = 22.6274: not rounded (torchvision: 46 x 22).
    a = detectron2_cell_anchors((32,), (0.5, 1.0, 2.0))
    assert a.dtype == torch.float32
    half = 16 * math.sqrt(2)
    torch.testing.assert_close(a, torch.tensor([[-half, -half / 2, half, half / 2], [-16.0, -16, 16, 16],
                                                [-half / 2, -half, half / 2, half]]), rtol=0, atol=1e-6)
    assert not torch.equal(a, torchvision_cell_anchors((32,), (0.5, 1.0, 2.0)))


@pytest.mark.parametrize("stride, sizes, grid", [(4, (32,), (5, 7)), (64, (512,), (2, 3)),
                                                 (16, (32, 64, 128, 256, 512), (3, 4))])
def test_unrounded_anchors_equal_detectron2(stride, sizes, grid):
    ratios = (0.5, 1.0, 2.0)
    gen = AnchorGenerator([sizes], [ratios], strides=[stride], rounded=False)
    got = gen([torch.zeros(1, 2, *grid)])[0]
    ref, ref_cell = _detectron2_reference(stride, sizes, ratios, grid)
    # Ours are ratio-major within a location, detectron2's size-major (the same when there is one size per level,
    # as in FPN; a detectron2 C4 RPN's channels are reordered by the converter).
    a, s = len(ratios), len(sizes)
    order = torch.tensor([si * a + ri for ri in range(a) for si in range(s)])
    assert torch.equal(gen.cell_anchors[0], ref_cell[order])  # bit for bit
    assert torch.equal(got, ref.view(-1, a * s, 4)[:, order].reshape(-1, 4))


def test_round_anchors_from_cfg():
    cfg = _fpn_cfg("RPN.ROUND_ANCHORS", "False")
    gen = AnchorGenerator.from_cfg(cfg)
    assert not gen.rounded and gen.cell_anchors[0][0, 0].item() == pytest.approx(-16 * math.sqrt(2))
    assert AnchorGenerator.from_cfg(_fpn_cfg()).cell_anchors[0][0].tolist() == [-23, -11, 23, 11]  # default: rounded
    cfg = get_cfg()
    cfg.merge_from_list(["RPN.ROUND_ANCHORS", "False"])
    assert_and_infer_cfg(cfg, make_immutable=False)
    assert not AnchorGenerator.from_cfg(cfg).rounded  # single-level (C4) too
    with pytest.raises(ValueError, match="ROUND_ANCHORS"):
        _fpn_cfg("RPN.ROUND_ANCHORS", "False", "MODEL.LEGACY_PLUS_ONE", "True")
    with pytest.raises(ValueError, match="rounded=False"):
        AnchorGenerator([(32,)], [(1.0,)], strides=[4], legacy_plus_one=True, rounded=False)
