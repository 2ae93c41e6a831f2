"""Keypoint test-time augmentation (TEST.KPS_AUG, maskrcnn/engine/tta.py) on a tiny seeded Keypoint R-CNN: enabled
without augmentations it is the plain path bit for bit; a flipped run is the plain run of the mirrored image with
its heatmaps mirrored back and left/right swapped; keypoint models keep their keypoints under box TTA; the config
refuses what cannot work."""
import pytest
import torch

from maskrcnn.config import ConfigError, assert_and_infer_cfg
from maskrcnn.data.transforms import keypoint_flip_indices
from maskrcnn.engine.tta import Augmentation, TestTimeAugmentation, with_test_time_augmentation
from maskrcnn.engine.tta_merge import merge_keypoint_heatmaps
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.roi_heads.keypoint_outputs import heatmaps_to_keypoints
from maskrcnn.ops.boxes import flip_boxes
from tests.modeling.test_generalized_rcnn import small_cfg

NAMES = ["nose", "left_eye", "right_eye", "tail"]
KPS = {"MODEL.MASK_ON": False, "MODEL.KEYPOINTS_ON": True, "KRCNN.NUM_KEYPOINTS": 4, "KRCNN.NUM_STACKED_CONVS": 2,
       "KRCNN.CONV_HEAD_DIM": 16, "KRCNN.ROI_XFORM_RESOLUTION": 7, "KRCNN.HEATMAP_SIZE": 28,
       "KRCNN.KEYPOINT_NAMES": NAMES, "TEST.SCORE_THRESH": 0.0}


def _cfg(**extra):
    return small_cfg("fpn", **{**KPS, **extra})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Generalized_RCNN(_cfg()).eval()


def _images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 80, 100, generator=g), torch.rand(3, 90, 70, generator=g)]


def test_merge_keypoint_heatmaps_heuristics():
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    assert torch.equal(merge_keypoint_heatmaps([a, b], "HM_AVG"), torch.stack([a, b]).mean(0))
    assert torch.equal(merge_keypoint_heatmaps([a, b], "HM_MAX"), torch.maximum(a, b))
    with pytest.raises(ValueError, match="TEST.KPS_AUG.HEUR"):
        merge_keypoint_heatmaps([a], "SOFT_AVG")
    with pytest.raises(ValueError, match="same shape"):
        merge_keypoint_heatmaps([a, b[:1]])


def test_enabled_without_augmentations_is_the_plain_path(model):
    cfg = _cfg(**{"TEST.KPS_AUG.ENABLED": True})
    tta = with_test_time_augmentation(model, cfg)
    assert isinstance(tta, TestTimeAugmentation) and tta.keypoint_augmentations == []
    with torch.no_grad():
        got, want = tta(_images()), model(_images())
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"boxes", "scores", "labels", "keypoints", "keypoints_scores"}
        assert w["boxes"].shape[0] > 0
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_box_augmentation_keeps_the_keypoints_of_a_keypoint_model(model):
    cfg = _cfg(**{"TEST.BBOX_AUG.ENABLED": True, "TEST.BBOX_AUG.H_FLIP": True})
    with torch.no_grad():
        out = with_test_time_augmentation(model, cfg)(_images())
    for o, im in zip(out, _images()):
        n = o["boxes"].shape[0]
        assert n > 0 and o["keypoints"].shape == (n, 4, 3) and o["keypoints_scores"].shape == (n, 4)
        # in input-image pixels, inside their boxes (a box narrower than 1 px counts as 1 px wide, as torchvision)
        x1, x2 = o["boxes"][:, None, 0], torch.maximum(o["boxes"][:, None, 2], o["boxes"][:, None, 0] + 1)
        assert (o["keypoints"][..., 0] >= x1 - 1e-3).all() and (o["keypoints"][..., 0] <= x2 + 1e-3).all()
        assert (o["boxes"][:, 2] <= im.shape[-1]).all()


def test_flipped_run_mirrors_the_heatmaps_back_and_swaps_left_and_right(model):
    ims = _images()
    flipped = [im.flip(-1) for im in ims]
    flip = keypoint_flip_indices(NAMES)
    assert flip.tolist() == [0, 2, 1, 3]
    rois = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 2.0, 60.0, 20.0]]), torch.tensor([[1.0, 3.0, 25.0, 50.0]])]
    heads = model.roi_heads
    with torch.no_grad():
        plain = TestTimeAugmentation(model)
        _, _, ref = plain.detect_boxes(ims)
        _, _, f_ref = plain.detect_boxes(flipped)
        assert f_ref.image_list.image_sizes == ref.image_list.image_sizes
        f_rois = [flip_boxes(r, s[1]) for r, s in zip(rois, ref.image_list.image_sizes)]
        own = heads.Keypoint_Outs(heads.Keypoint_Head(ref.features, rois))
        mirrored = heads.Keypoint_Outs(heads.Keypoint_Head(f_ref.features, f_rois)).flip(-1)[:, flip]
        for heur, combine in (("HM_AVG", lambda a, b: torch.stack([a, b]).mean(0)), ("HM_MAX", torch.maximum)):
            flip_run = Augmentation(plain.reference.scale, plain.reference.max_size, hflip=True)
            tta = TestTimeAugmentation(model, keypoint_augmentations=[flip_run], kps_heur=heur, keypoint_flip=flip)
            kps, scores = tta.detect_keypoints(ims, ref, rois)
            want_kps, want_scores = heatmaps_to_keypoints(combine(own, mirrored), torch.cat(rois))
            torch.testing.assert_close(torch.cat(kps), want_kps, rtol=0, atol=0)
            torch.testing.assert_close(torch.cat(scores), want_scores, rtol=0, atol=0)


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="TEST.KPS_AUG.ENABLED needs the keypoint head"):
        assert_and_infer_cfg(small_cfg("fpn", **{"TEST.KPS_AUG.ENABLED": True}))
    with pytest.raises(ConfigError, match="KRCNN.KEYPOINT_NAMES has 3 names"):
        assert_and_infer_cfg(small_cfg("fpn", **{**KPS, "KRCNN.KEYPOINT_NAMES": NAMES[:3], "TEST.KPS_AUG.ENABLED": True,
                                                 "TEST.KPS_AUG.H_FLIP": True}))
    with pytest.raises(ConfigError, match="TEST.KPS_AUG.HEUR"):
        assert_and_infer_cfg(small_cfg("fpn", **{**KPS, "TEST.KPS_AUG.HEUR": "SOFT_AVG"}))


def test_module_refuses_a_flip_without_the_flip_map(model):
    with pytest.raises(ValueError, match="keypoint_flip"):
        TestTimeAugmentation(model, keypoint_augmentations=[Augmentation(64, 64, hflip=True)])
