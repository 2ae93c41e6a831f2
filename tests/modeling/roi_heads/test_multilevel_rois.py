"""FPN.MULTILEVEL_ROIS: True pools each RoI from the level its size maps to; False pools every RoI from the finest RoI
level (P2), as Detectron's P2-only FPN bodies. Both the box and the mask head follow the key."""
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.roi_heads.box_head import Roi2MLPHead, roi_feature_indices
from maskrcnn.modeling.roi_heads.mask_head import MaskRCNNFCNHead
from maskrcnn.ops.roi_align import roi_align

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]  # P2..P6 as the FPN body returns them


def _cfg(multilevel):
    cfg = get_cfg()
    cfg.merge_from_list(["FPN.MULTILEVEL_ROIS", multilevel, "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
                         "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 2, "FAST_RCNN.MLP_HEAD_DIM", 16,
                         "MRCNN.ROI_XFORM_RESOLUTION", 14, "MRCNN.ROI_XFORM_SAMPLING_RATIO", 2,
                         "MRCNN.DIM_REDUCED", 8, "MRCNN.DILATION", 1])
    return cfg


def _features():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 4, 256 // int(1 / s), 256 // int(1 / s), generator=g) for s in SCALES]


@pytest.mark.parametrize("multilevel, indices", [(True, [0, 1, 2, 3]), (False, [0])])
def test_feature_indices_follow_the_key(multilevel, indices):
    assert roi_feature_indices(_cfg(multilevel), SCALES) == indices
    assert Roi2MLPHead.from_cfg(_cfg(multilevel), 4, SCALES).feature_indices == indices
    assert MaskRCNNFCNHead.from_cfg(_cfg(multilevel), 4, SCALES).feature_indices == indices


def test_single_level_body_is_unaffected():
    assert roi_feature_indices(_cfg(False), [1 / 16]) == [0]
    assert roi_feature_indices(_cfg(True), [1 / 16]) == [0]


@torch.no_grad()
def test_false_pools_a_large_roi_from_p2():
    feats = _features()
    big = torch.tensor([[0.0, 0.0, 0.0, 240.0, 240.0]])  # sqrt(area) 240: level 4 when multi-level
    only_p2 = [feats[0]] + [torch.zeros_like(f) for f in feats[1:]]
    without_p2 = [torch.zeros_like(feats[0])] + feats[1:]
    for cls, resolution in ((Roi2MLPHead, 7), (MaskRCNNFCNHead, 14)):
        single = cls.from_cfg(_cfg(False), 4, SCALES)
        multi = cls.from_cfg(_cfg(True), 4, SCALES)
        torch.testing.assert_close(single.roi_xform(feats[0], big),
                                   roi_align(feats[0], big, (resolution, resolution), 1 / 4, 2))
        torch.testing.assert_close(multi.roi_xform(feats[:4], big),
                                   roi_align(feats[2], big, (resolution, resolution), 1 / 16, 2))
        # Through the whole head: P2 is all the single-level head reads, and nothing the multi-level one reads here.
        assert torch.equal(single(feats, big), single(only_p2, big))
        assert torch.equal(multi(feats, big), multi(without_p2, big))
        assert not torch.equal(multi(feats, big), multi(only_p2, big))
