import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList as TVImageList

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.rpn.anchors import AnchorGenerator, detectron_cell_anchors, torchvision_cell_anchors


def test_torchvision_cell_anchors_hand_computed():
    # size 32, ratio 0.5: h = 32*sqrt(.5) = 22.63, w = 32/sqrt(.5) = 45.25 -> round(+-w/2, +-h/2)
    # size 32, ratio 1: +-16; ratio 2: h = 45.25, w = 22.63
    a = torchvision_cell_anchors((32,), (0.5, 1.0, 2.0))
    assert a.tolist() == [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]


def test_detectron_anchors_hand_computed():
    # Detectron's generate_anchors(stride=16, sizes=(128, 256, 512), ratios=(0.5, 1, 2)).
    # Ratio 0.5 on the 16x16 base box (centre 7.5): w = round(sqrt(256 / 0.5)) = 23, h = round(23 * 0.5) = 12
    # (half to even); scale 8 -> 184 x 96 around 7.5: [7.5 - 91.5, 7.5 - 47.5, 7.5 + 91.5, 7.5 + 47.5].
    # Ratio 1, scale 8: 128 x 128 -> [7.5 - 63.5, ..., 7.5 + 63.5] = [-56, -56, 71, 71].
    a = detectron_cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0))
    assert a.shape == (9, 4)
    assert a[0].tolist() == [-84, -40, 99, 55]
    assert a[3].tolist() == [-56, -56, 71, 71]
    assert a[5].tolist() == [-248, -248, 263, 263]  # ratio 1, scale 32: 512 x 512
    # ratio 2: w = round(sqrt(128)) = 11, h = 22; scale 8 -> 88 x 176: [7.5-43.5, 7.5-87.5, 7.5+43.5, 7.5+87.5]
    assert a[6].tolist() == [-36, -80, 51, 95]


@pytest.mark.parametrize("batch", [(1, 3, 128, 160), (2, 3, 96, 224)])
def test_fpn_anchors_equal_torchvision(batch):
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    ours = AnchorGenerator(sizes, ratios, strides=None)
    tv = TVAnchorGenerator(sizes, ratios)
    h, w = batch[-2:]
    feats = [torch.zeros(batch[0], 8, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32, 64)]
    got = torch.cat(ours(feats, batch_shape=(h, w)))
    ref = tv(TVImageList(torch.zeros(batch), [(h, w)] * batch[0]), feats)
    for r in ref:
        assert torch.equal(got, r)
    assert ours.num_anchors_per_location() == [3] * 5


def test_from_cfg_single_level_and_fpn():
    cfg = get_cfg()
    assert_and_infer_cfg(cfg, make_immutable=False)
    gen = AnchorGenerator.from_cfg(cfg)
    assert gen.num_anchors_per_location() == [15] and gen.strides == [16]
    a = gen([torch.zeros(1, 4, 2, 3)])[0]
    assert a.shape == (2 * 3 * 15, 4)
    assert torch.equal(a[15] - a[0], torch.tensor([16.0, 0, 16, 0]))  # next location along x
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet50_conv5_body", "FAST_RCNN.ROI_BOX_HEAD",
                         "fast_rcnn_heads.roi_2mlp_head", "MRCNN.ROI_MASK_HEAD",
                         "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs", "MODEL.LEGACY_PLUS_ONE", "True"])
    assert_and_infer_cfg(cfg, make_immutable=False)
    gen = AnchorGenerator.from_cfg(cfg)
    assert gen.strides == [4, 8, 16, 32, 64] and gen.legacy_plus_one
    assert gen.cell_anchors[0][1].tolist() == [-14, -14, 17, 17]  # 32x32 around (4-1)/2 = 1.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator([(32,), (64,)], [(1.0,), (1.0,), (1.0,)])
    with pytest.raises(ValueError, match="explicit strides"):
        AnchorGenerator([(32,)], [(1.0,)], None, legacy_plus_one=True)
    with pytest.raises(ValueError, match="batch_shape"):
        AnchorGenerator([(32,)], [(1.0,)])([torch.zeros(1, 1, 4, 4)])
