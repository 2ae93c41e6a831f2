"""Keypoint AP (iou type ``keypoints``, pycocotools' OKS) through the same path test_net takes: prediction records,
COCO results, a ground truth built from the dataset, evaluate_coco with the dataset's OKS sigmas; and the
synthetic keypoint variant (extreme points) it is developed on."""
import numpy as np
import pytest
import torch

from maskrcnn.data.catalog import build_dataset
from maskrcnn.data.datasets.synthetic import KEYPOINT_NAMES, extreme_points
from maskrcnn.data.transforms import hflip
from maskrcnn.engine.inference import prediction_record, records_to_coco_results
from maskrcnn.evaluation.coco import COCO_PERSON_OKS_SIGMAS, coco_gt_from_dataset, evaluate_coco, oks_sigmas

SIGMAS = [0.1] * 4


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def dataset():
    return build_dataset("synthetic:keypoints:val", is_train=False)


def _records(dataset, shift=0.0, drop=False):
    recs = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        n = t["labels"].shape[0]
        kp = t["keypoints"].clone()
        kp[..., 2] = 1
        kp[..., 0] += shift
        out = {"boxes": t["boxes"], "scores": torch.linspace(1.0, 0.5, n), "labels": t["labels"], "keypoints": kp}
        if drop:
            out.pop("keypoints")
        recs.append(prediction_record(i, i, out))
    return recs


def test_extreme_points_of_a_rectangle_and_a_triangle():
    m = np.zeros((20, 30), np.uint8)
    m[4:10, 5:15] = 1  # rows 4..9, cols 5..14
    torch.testing.assert_close(torch.from_numpy(extreme_points(m)), torch.tensor(
        [[10.0, 4.5, 2], [5.5, 7.0, 2], [14.5, 7.0, 2], [10.0, 9.5, 2]]))
    tri = np.tril(np.ones((5, 5), np.uint8))  # apex at (row 0, col 0); bottom row full
    pts = extreme_points(tri)
    assert pts[0, :2].tolist() == [0.5, 0.5] and pts[2, :2].tolist() == [4.5, 4.5]
    with pytest.raises(ValueError, match="empty"):
        extreme_points(np.zeros((3, 3), np.uint8))


def test_keypoint_variant_targets_flip_with_left_and_right_swapped(dataset):
    image, t = dataset[3]
    assert dataset.keypoint_names == list(KEYPOINT_NAMES) and dataset.num_keypoints == 4
    n = t["labels"].shape[0]
    assert t["keypoints"].shape == (n, 4, 3) and (t["keypoints"][..., 2] == 2).all()
    boxes = t["boxes"]
    assert (t["keypoints"][..., 0] >= boxes[:, None, 0]).all() and (t["keypoints"][..., 0] <= boxes[:, None, 2]).all()
    _, f = hflip(image, t, dataset.keypoint_flip_indices)
    w = image.shape[-1]
    torch.testing.assert_close(f["keypoints"][:, 1, 0], w - t["keypoints"][:, 2, 0])  # new left = old right
    torch.testing.assert_close(f["keypoints"][:, 0, 0], w - t["keypoints"][:, 0, 0])
    plain = build_dataset("synthetic:val", is_train=False)
    assert "keypoints" not in plain[3][1] and torch.equal(plain[3][1]["boxes"], t["boxes"])


def test_perfect_keypoints_score_100_and_shifted_ones_less(dataset):
    gt = coco_gt_from_dataset(dataset)
    ann = gt.dataset["annotations"][0]
    assert ann["num_keypoints"] == 4 and len(ann["keypoints"]) == 12
    assert gt.dataset["categories"][0]["keypoints"] == list(KEYPOINT_NAMES)
    res = records_to_coco_results(_records(dataset), dataset)
    assert set(res) == {"bbox", "keypoints"} and len(res["keypoints"][0]["keypoints"]) == 12
    m = evaluate_coco(gt, res, kpt_oks_sigmas=SIGMAS, detailed=True, log=_quiet)
    assert m["keypoints"]["AP"] == pytest.approx(100.0) and m["bbox"]["AP"] == pytest.approx(100.0)
    assert set(m["keypoints"]) >= {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}
    shifted = records_to_coco_results(_records(dataset, shift=3.0), dataset)
    worse = evaluate_coco(gt, {"keypoints": shifted["keypoints"]}, kpt_oks_sigmas=SIGMAS, log=_quiet)
    assert worse["keypoints"]["AP"] < 90.0
    looser = evaluate_coco(gt, {"keypoints": shifted["keypoints"]}, kpt_oks_sigmas=[0.5] * 4, log=_quiet)
    assert looser["keypoints"]["AP"] > worse["keypoints"]["AP"]
    assert "keypoints" not in records_to_coco_results(_records(dataset, drop=True), dataset)


def test_oks_sigmas_default_to_coco_person_and_other_sets_must_say():
    np.testing.assert_allclose(oks_sigmas(17), np.asarray(COCO_PERSON_OKS_SIGMAS) / 10)
    np.testing.assert_allclose(oks_sigmas(4, SIGMAS), SIGMAS)
    with pytest.raises(ValueError, match="TEST.KEYPOINT_OKS_SIGMAS"):
        oks_sigmas(4)
    with pytest.raises(ValueError, match="one positive sigma per keypoint"):
        oks_sigmas(4, [0.1, 0.1])


def test_keypoints_are_scaled_back_to_the_recorded_image_size():
    out = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1]), "keypoints": torch.tensor([[[12.0, 14.0, 1.0], [18.0, 16.0, 1.0]]])}
    rec = prediction_record(0, 0, out, image_size=(50, 100), original_size=(100, 200))
    assert rec["keypoints"] == [[24.0, 28.0, 1.0, 36.0, 32.0, 1.0]]


def test_an_image_without_detections_gives_an_empty_keypoint_record():
    out = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
           "keypoints": torch.zeros(0, 4, 3)}
    assert prediction_record(0, 0, out)["keypoints"] == []
    assert prediction_record(0, 0, out, image_size=(50, 100), original_size=(100, 200))["keypoints"] == []
