"""Test-time augmentation (maskrcnn/engine/tta.py) on a tiny seeded model: with no augmentation it is the plain path
bit for bit at all three call sites (model eval contract / test_net's evaluate_on_dataset, Predictor,
core.test.im_detect_all); a flipped run is exactly the plain run of the flipped image; runs map back into the
reference frame; Detectron's rules fail clearly."""
import json
import os

import numpy as np
import pytest
import torch

from maskrcnn import Predictor
from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg
from maskrcnn.core.test import im_detect_all
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.inference import evaluate_on_dataset
from maskrcnn.engine.speed import prepare_for_inference
from maskrcnn.engine.tta import Augmentation, TestTimeAugmentation, with_test_time_augmentation
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.ops.boxes import flip_boxes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
# Every RoI scores (threshold 0) so that a random model returns a full set of detections to compare.
TINY = ["TEST.SCORE_THRESH", 0.0, "MODEL.DEVICE", "cpu"]
IDENTITY_ONLY = ["TEST.BBOX_AUG.ENABLED", True, "TEST.MASK_AUG.ENABLED", True]
EVERYTHING = ["TEST.BBOX_AUG.ENABLED", True, "TEST.BBOX_AUG.H_FLIP", True, "TEST.BBOX_AUG.SCALES", "[48, 96]",
              "TEST.BBOX_AUG.SCALE_H_FLIP", True, "TEST.BBOX_AUG.ASPECT_RATIOS", "[0.75]",
              "TEST.BBOX_AUG.ASPECT_RATIO_H_FLIP", True, "TEST.MASK_AUG.ENABLED", True, "TEST.MASK_AUG.H_FLIP", True,
              "TEST.MASK_AUG.SCALES", "[96]"]


def make_cfg(*overrides):
    cfg = get_cfg()
    cfg.merge_from_file(SMOKE)
    cfg.merge_from_list(TINY + [v for o in overrides for v in o])
    return assert_and_infer_cfg(cfg)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Generalized_RCNN(make_cfg()).eval()


def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 60, 80, generator=g), torch.rand(3, 70, 50, generator=g)]


def assert_equal_detections(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w) and len(w["boxes"]) > 0
        for k in w:
            assert torch.equal(g[k], w[k]), k


# --- settings ---------------------------------------------------------------------------------------------------------
def test_augmentations_from_cfg_follow_detectron_order(model):
    tta = TestTimeAugmentation.from_cfg(model, make_cfg(EVERYTHING))
    assert tta.reference == Augmentation(64, 64)
    assert tta.bbox_augmentations == [Augmentation(64, 64, hflip=True), Augmentation(48, 4000), Augmentation(48, 4000, hflip=True),
                   Augmentation(96, 4000), Augmentation(96, 4000, hflip=True), Augmentation(64, 64, aspect_ratio=0.75),
                   Augmentation(64, 64, hflip=True, aspect_ratio=0.75)]
    assert tta.mask_augmentations == [Augmentation(64, 64, hflip=True), Augmentation(96, 4000)]
    # Not ENABLED: no extra run, whatever the other keys say.
    off = make_cfg(EVERYTHING, ["TEST.BBOX_AUG.ENABLED", False, "TEST.MASK_AUG.ENABLED", False])
    tta = TestTimeAugmentation.from_cfg(model, off)
    assert tta.bbox_augmentations == [] and tta.mask_augmentations == []


def test_without_augmentation_the_model_itself_is_used(model):
    assert with_test_time_augmentation(model, model.cfg) is model
    assert isinstance(with_test_time_augmentation(model, make_cfg(IDENTITY_ONLY)), TestTimeAugmentation)


@pytest.mark.parametrize("overrides, message", [
    (["TEST.BBOX_AUG.ENABLED", True, "TEST.BBOX_AUG.SCORE_HEUR", "AVG"],
     "SCORE_HEUR = 'AVG' and TEST.BBOX_AUG.COORD_HEUR = 'UNION'"),
    (["TEST.BBOX_AUG.SCALE_SIZE_DEP", True], "TEST.BBOX_AUG.SCALE_SIZE_DEP = True is not allowed"),
    (["TEST.MASK_AUG.SCALE_SIZE_DEP", True], "TEST.MASK_AUG.SCALE_SIZE_DEP = True is not allowed"),
    (["TEST.BBOX_AUG.SCALES", "[0, 800]"], "TEST.BBOX_AUG.SCALES = [0, 800] is not allowed"),
    (["TEST.MASK_AUG.ASPECT_RATIOS", "[-1.0]"], "TEST.MASK_AUG.ASPECT_RATIOS = [-1.0] is not allowed"),
    (["TEST.MASK_AUG.HEUR", "MAX"], "TEST.MASK_AUG.HEUR = 'MAX' is not allowed"),
    (["TEST.MASK_AUG.ENABLED", True, "MODEL.MASK_ON", False], "TEST.MASK_AUG.ENABLED needs the mask head"),
])
def test_impossible_settings_fail_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_cfg(overrides)


def test_rpn_proposals_need_the_union_heuristic(model):
    avg = make_cfg(["TEST.BBOX_AUG.ENABLED", True, "TEST.BBOX_AUG.SCORE_HEUR", "AVG",
                    "TEST.BBOX_AUG.COORD_HEUR", "ID", "TEST.BBOX_AUG.H_FLIP", True])
    with pytest.raises(ConfigError, match=r"SCORE_HEUR = 'AVG' / COORD_HEUR = 'ID' merge the augmentations RoI by "
                                          r"RoI.*use 'UNION'"):
        with_test_time_augmentation(model, avg)  # test_net and Predictor: before any image is run
    model_avg = Generalized_RCNN(avg).eval()
    with pytest.raises(ConfigError, match="core.test.im_detect_all\\(box_proposals=...\\)"):
        im_detect_all(model_avg, np.zeros((40, 50, 3), np.uint8))


# --- no augmentation: the plain path, bit for bit ----------------------------------------------------------------------
def test_identity_only_equals_the_model(model):
    tta = TestTimeAugmentation.from_cfg(model, make_cfg(IDENTITY_ONLY)).eval()
    with torch.no_grad():
        assert_equal_detections(tta(images()), model(images()))


def test_identity_only_equals_the_model_under_bf16_autocast():
    cfg = make_cfg(["TEST.AMP", "bf16", "TEST.FUSE_FROZEN_BN", False, "TEST.CHANNELS_LAST", False])
    torch.manual_seed(0)
    m = Generalized_RCNN(cfg)
    prepare_for_inference(m, cfg)
    tta = TestTimeAugmentation.from_cfg(m, make_cfg(IDENTITY_ONLY, ["TEST.AMP", "bf16"])).eval()
    assert tta.amp == "bf16"
    with torch.no_grad():
        assert_equal_detections(tta(images()), m(images()))


def test_identity_only_predictor_equals_plain_predictor(model):
    prepared = Generalized_RCNN(model.cfg)
    prepared.load_state_dict(model.state_dict())
    prepare_for_inference(prepared, model.cfg)
    plain = Predictor.from_model(prepared, model.cfg, prepare=False, batch_size=2)
    tta = Predictor.from_model(prepared, make_cfg(IDENTITY_ONLY), prepare=False, batch_size=2)
    assert plain._detector is prepared and isinstance(tta._detector, TestTimeAugmentation)
    for g, w in zip(tta(images()), plain(images())):
        assert g["class_names"] == w["class_names"] and len(w["boxes"]) > 0
        for k in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(g[k], w[k]), k


def test_identity_only_test_net_evaluation_equals_plain(model, tmp_path):
    dataset = SyntheticShapesDataset("val", num_images=3, image_size=(48, 56), max_object_size=30)
    files = {}
    for name, cfg in (("plain", model.cfg), ("tta", make_cfg(IDENTITY_ONLY))):
        out = tmp_path / name
        evaluate_on_dataset(model, dataset, cfg, output_dir=str(out), log=lambda *_: None)
        files[name] = {f: (out / f).read_text() for f in ("bbox_results.json", "segm_results.json")}
    assert files["tta"] == files["plain"] and len(json.loads(files["plain"]["bbox_results.json"])) > 0


@pytest.mark.parametrize("proposals, heur", [(False, "UNION"), (True, "AVG"), (True, "ID")])
def test_identity_only_im_detect_all_equals_plain(model, proposals, heur):
    im = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    boxes = np.array([[5, 5, 40, 30], [20, 10, 70, 55], [0, 0, 80, 60]], np.float32) if proposals else None
    plain_boxes, plain_segms, _ = im_detect_all(model, im, box_proposals=boxes)
    cfg = make_cfg(IDENTITY_ONLY, ["TEST.BBOX_AUG.SCORE_HEUR", heur, "TEST.BBOX_AUG.COORD_HEUR", heur])
    tta_model = Generalized_RCNN(cfg).eval()
    tta_model.load_state_dict(model.state_dict())
    got_boxes, got_segms, _ = im_detect_all(tta_model, im, box_proposals=boxes)
    assert sum(len(b) for b in plain_boxes) > 0
    for j in range(len(plain_boxes)):
        assert np.array_equal(got_boxes[j], plain_boxes[j])
        assert [s["counts"] for s in got_segms[j]] == [s["counts"] for s in plain_segms[j]]


# --- flips and frames -------------------------------------------------------------------------------------------------
def test_flipped_run_is_the_plain_run_of_the_flipped_image_unflipped(model):
    ims = images()
    flipped = [im.flip(-1) for im in ims]
    with torch.no_grad():
        flip_only = TestTimeAugmentation(model, [Augmentation(64, 64, hflip=True)],
                                         [Augmentation(64, 64, hflip=True)], mask_heur="SOFT_AVG")
        probs, boxes, ref = flip_only.detect_boxes(ims)
        plain = TestTimeAugmentation(model)
        p_probs, p_boxes, p_ref = plain.detect_boxes(flipped)
        own_probs, own_boxes, _ = plain.detect_boxes(ims)
        for i in range(len(ims)):
            n = p_probs[i].shape[0]
            width = ref.image_list.image_sizes[i][1]
            assert p_ref.image_list.image_sizes[i] == ref.image_list.image_sizes[i]
            # UNION: the flipped run's RoIs first, mapped back with x -> W - x; the plain run's last.
            assert torch.equal(probs[i][:n], p_probs[i])
            assert torch.equal(boxes[i][:n], flip_boxes(p_boxes[i], width))
            assert torch.equal(probs[i][n:], own_probs[i]) and torch.equal(boxes[i][n:], own_boxes[i])
        # Masks: boxes with integer coordinates flip exactly; the flipped run's masks come back mirrored.
        rois = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [10.0, 2.0, 60.0, 20.0]]),
                torch.tensor([[1.0, 3.0, 25.0, 50.0]])]
        labels = [torch.tensor([1, 3]), torch.tensor([2])]
        merged = flip_only.detect_masks(ims, ref, rois, labels)
        own = plain.detect_masks(ims, ref, rois, labels)
        mirrored = plain.detect_masks(flipped, p_ref, [flip_boxes(r, s[1]) for r, s in
                                                      zip(rois, p_ref.image_list.image_sizes)], labels)
        for m, o, f in zip(merged, own, mirrored):
            assert torch.equal(m, (torch.stack([o, f.flip(-1)])).mean(0))


def test_given_proposals_come_back_to_the_reference_frame_from_every_run():
    """Without box regression every run predicts its own RoIs: mapped back they are the reference RoIs (flip,
    scale and aspect ratio undone), so AVG of the coordinates gives the plain run's."""
    cfg = make_cfg(EVERYTHING, ["TEST.BBOX_REG", False])
    torch.manual_seed(0)
    m = Generalized_RCNN(cfg).eval()
    tta = TestTimeAugmentation.from_cfg(m, cfg)
    props = [torch.tensor([[5.0, 5.0, 40.0, 30.0], [20.0, 10.0, 70.0, 55.0]]), torch.tensor([[3.0, 8.0, 45.0, 66.0]])]
    with torch.no_grad():
        _, boxes, ref = tta.detect_boxes(images(), props)
    runs = len(tta.bbox_augmentations) + 1
    for b, p, r_size, o_size in zip(boxes, props, ref.image_list.image_sizes, ref.original_sizes):
        expected = p * torch.tensor([r_size[1] / o_size[1], r_size[0] / o_size[0]] * 2)
        per_run = b.reshape(runs, p.shape[0], -1, 4)
        for k in range(per_run.shape[2]):
            torch.testing.assert_close(per_run[:, :, k], expected.expand(runs, -1, -1), rtol=0, atol=2e-4)


def test_every_augmentation_runs_end_to_end(model):
    cfg = make_cfg(EVERYTHING, ["TEST.MASK_AUG.HEUR", "LOGIT_AVG"])
    tta = with_test_time_augmentation(model, cfg).eval()
    with torch.no_grad():
        out = tta(images())
        plain = model(images())
    for o, p, im in zip(out, plain, images()):
        assert o["masks"].shape[-2:] == im.shape[-2:] and o["boxes"].shape[0] == p["boxes"].shape[0] > 0
        assert (o["masks"] >= 0).all() and (o["masks"] <= 1).all()
        assert o["scores"][0] >= p["scores"][0]  # the plain run's candidates are among the union's
