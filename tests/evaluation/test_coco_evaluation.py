import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.evaluation.coco import (METRIC_NAMES, RECALL_NAMES, class_names, coco_gt_from_dataset,
                                      contiguous_to_category_id, evaluate_coco, mask_to_rle, write_metrics)


def _synthetic(n=12):
    return SyntheticShapesDataset("val", num_images=n, image_size=(64, 64), max_object_size=40)


def _gt_as_detections(dataset, cat_of, shift=0.0, drop_masks=False):
    bbox, segm = [], []
    for i in range(len(dataset)):
        _, t = dataset[i]
        image_id = dataset.get_image_info(i)["id"]
        rles = mask_to_rle(t["masks"].numpy())
        for k in range(t["labels"].numel()):
            x1, y1, x2, y2 = t["boxes"][k].tolist()
            common = {"image_id": image_id, "category_id": cat_of[int(t["labels"][k])], "score": 1.0}
            bbox.append(dict(common, bbox=[x1 + shift, y1 + shift, x2 - x1, y2 - y1]))
            segm.append(dict(common, segmentation=rles[k]))
    return {"bbox": bbox, "segm": segm}


def test_ground_truth_as_detections_scores_100():
    ds = _synthetic()
    gt = coco_gt_from_dataset(ds)
    lines = []
    metrics = evaluate_coco(gt, _gt_as_detections(ds, contiguous_to_category_id(ds)), log=lines.append)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(100.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(100.0)
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
    text = "\n".join(lines)
    assert text.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000") == 2
    assert "per-category bbox AP" in text and "rectangle" in text and "ellipse" in text


def test_shifted_boxes_score_below_100_and_masks_are_unaffected():
    ds = _synthetic()
    gt = coco_gt_from_dataset(ds)
    dets = _gt_as_detections(ds, contiguous_to_category_id(ds), shift=4.0)
    metrics = evaluate_coco(gt, dets, log=lambda m: None)
    assert metrics["bbox"]["AP"] < 80.0
    assert metrics["segm"]["AP"] == pytest.approx(100.0)


def test_gt_fields_match_the_dataset_targets():
    ds = _synthetic(4)
    gt = coco_gt_from_dataset(ds)
    for i in range(len(ds)):
        image, t = ds[i]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[i]))
        assert len(anns) == t["labels"].numel()
        img = gt.loadImgs([i])[0]
        assert (img["height"], img["width"]) == tuple(image.shape[-2:])
        for a, box, label, area, m in zip(anns, t["boxes"], t["labels"], t["area"], t["masks"]):
            x1, y1, x2, y2 = box.tolist()
            assert a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
            assert a["category_id"] == int(label) and a["iscrowd"] == 0 and a["area"] == pytest.approx(float(area))
            assert np.array_equal(mask_util.decode(a["segmentation"]), m.numpy())


class _MappedDataset:
    """Two images with non-contiguous category ids (as a COCO json has) and a crowd region."""

    classes = ["__background__", "cat", "dog"]
    contiguous_to_category_id = {1: 17, 2: 18}

    def __len__(self):
        return 2

    def get_image_info(self, i):
        return {"id": 100 + i, "file_name": f"im{i}.png", "height": 20, "width": 30}

    def __getitem__(self, i):
        masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
        masks[0, 2:10, 3:12] = 1
        masks[1, 5:18, 15:28] = 1
        boxes = torch.tensor([[3.0, 2.0, 12.0, 10.0], [15.0, 5.0, 28.0, 18.0]])
        return torch.zeros(3, 20, 30), {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks,
                                        "iscrowd": torch.tensor([0, i])}


def test_category_ids_are_mapped_and_crowds_are_ignored():
    ds = _MappedDataset()
    assert class_names(ds) == {17: "cat", 18: "dog"}
    gt = coco_gt_from_dataset(ds)
    assert sorted(gt.getCatIds()) == [17, 18] and sorted(gt.getImgIds()) == [100, 101]
    assert [a["iscrowd"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[101]))] == [0, 1]
    # Detecting only the non-crowd instances is a perfect score: crowd regions are never required.
    dets = [{"image_id": 100, "category_id": 17, "bbox": [3, 2, 9, 8], "score": 1.0},
            {"image_id": 100, "category_id": 18, "bbox": [15, 5, 13, 13], "score": 1.0},
            {"image_id": 101, "category_id": 17, "bbox": [3, 2, 9, 8], "score": 1.0}]
    metrics = evaluate_coco(gt, {"bbox": dets}, log=lambda m: None)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)


def test_no_detections_give_zero_and_metrics_json_has_nulls(tmp_path):
    ds = _synthetic(4)
    gt = coco_gt_from_dataset(ds)
    lines = []
    metrics = evaluate_coco(gt, {"bbox": [], "segm": []}, log=lines.append)
    assert metrics["bbox"] == {k: 0.0 for k in METRIC_NAMES}
    assert "no detections" in lines[0]
    full = evaluate_coco(gt, _gt_as_detections(ds, contiguous_to_category_id(ds)), log=lambda m: None)
    assert np.isnan(full["bbox"]["APl"])  # 64x64 images hold no large object
    path = tmp_path / "metrics.json"
    write_metrics(str(path), full)
    data = json.loads(path.read_text())
    assert set(data) == {"bbox", "segm"} and set(data["bbox"]) == set(METRIC_NAMES)
    assert data["bbox"]["APl"] is None and data["bbox"]["AP"] == pytest.approx(100.0)


def test_evaluation_restricted_to_some_images():
    ds = _synthetic(6)
    gt = coco_gt_from_dataset(ds)
    dets = _gt_as_detections(ds, contiguous_to_category_id(ds))
    only = {k: [d for d in v if d["image_id"] < 3] for k, v in dets.items()}
    assert evaluate_coco(gt, only, log=lambda m: None)["bbox"]["AP"] < 100.0
    assert evaluate_coco(gt, only, img_ids=[0, 1, 2], log=lambda m: None)["bbox"]["AP"] == pytest.approx(100.0)


def test_own_coco_ground_truth_is_used_and_completed():
    coco = COCO()
    coco.dataset = {"images": [{"id": 5, "height": 10, "width": 10, "file_name": "a.png"}],
                    "categories": [{"id": 3, "name": "thing"}],
                    "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 1, 4, 4],
                                     "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]}
    coco.createIndex()

    class WithCoco:
        pass

    ds = WithCoco()
    ds.coco = coco
    gt = coco_gt_from_dataset(ds)
    ann = gt.loadAnns([1])[0]
    assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(16.0, abs=4.0)
    assert "iscrowd" not in coco.dataset["annotations"][0]  # the dataset's own object is not modified


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster_coco_eval"])
def test_objects_without_a_segmentation_are_ignored_by_the_mask_ap_only(evaluator):
    # A json that masks some objects and gives others a box only: both evaluators failed in the mask evaluation
    # (after the whole inference). Those objects are now ignored regions there, and still count in the box AP.
    ds = _synthetic(6)
    gt = coco_gt_from_dataset(ds)
    dets = _gt_as_detections(ds, contiguous_to_category_id(ds))
    box_only = [a["id"] for a in gt.dataset["annotations"][::3]]
    data = json.loads(json.dumps(gt.dataset))
    for a in data["annotations"]:
        if a["id"] in box_only:
            del a["segmentation"]
    partial = COCO()
    partial.dataset = data
    partial.createIndex()
    lines = []
    metrics = evaluate_coco(partial, dets, log=lines.append, evaluator=evaluator)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    # The masks found on the box-only objects are neither hits nor false positives.
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert f"segm: {len(box_only)} ground-truth object(s) have no usable segmentation" in "\n".join(lines)
    # A wrong mask on a masked object still costs AP: the others are not ignored.
    bad = dict(dets, segm=[dict(d) for d in dets["segm"]])
    masked = {(a["image_id"], tuple(a["bbox"])) for a in data["annotations"] if "segmentation" in a}
    k = next(k for k, d in enumerate(dets["bbox"]) if (d["image_id"], tuple(d["bbox"])) in masked)
    bad["segm"][k]["segmentation"] = mask_to_rle(np.zeros((1, 64, 64), np.uint8))[0]
    assert evaluate_coco(partial, bad, log=lambda m: None, evaluator=evaluator)["segm"]["AP"] < 99.0
    assert "segmentation" not in partial.dataset["annotations"][0]  # the caller's ground truth is not modified


def test_mask_to_rle_round_trip_and_shape_check():
    masks = (np.random.default_rng(0).random((3, 7, 9)) > 0.5).astype(np.uint8)
    rles = mask_to_rle(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    json.dumps(rles)
    for r, m in zip(rles, masks):
        assert np.array_equal(mask_util.decode(r), m)
    assert mask_to_rle(np.zeros((0, 4, 4))) == []
    with pytest.raises(ValueError, match="N, H, W"):
        mask_to_rle(np.zeros((4, 4)))


def test_detailed_metrics_have_recalls_and_ap_per_named_category_only():
    """A COCO json may carry a ``_background_`` category (id 0, labelme2coco does) that the dataset does not train:
    with ``names`` given, the per-category APs cover the named categories, with and without detections."""
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 20, "width": 20}],
                    "categories": [{"id": 0, "name": "_background_"}, {"id": 1, "name": "thing"},
                                   {"id": 2, "name": "other"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64,
                                     "iscrowd": 0}]}
    coco.createIndex()
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "score": 0.9}]
    names = {1: "thing", 2: "other"}
    lines = []
    metrics = evaluate_coco(coco, {"bbox": dets}, names=names, detailed=True, log=lines.append)["bbox"]
    assert set(metrics) == set(METRIC_NAMES) | set(RECALL_NAMES) | {"AP-thing", "AP-other"}
    assert metrics["AP-thing"] == pytest.approx(100.0) and np.isnan(metrics["AP-other"])  # no ground truth
    assert metrics["AR100"] == pytest.approx(100.0) and metrics["AR1"] == pytest.approx(100.0)
    assert "_background_" not in lines[-1] and "thing" in lines[-1]
    empty = evaluate_coco(coco, {"bbox": []}, names=names, detailed=True, log=lambda m: None)["bbox"]
    assert set(empty) == set(metrics) and all(v == 0.0 for v in empty.values())
    # Without names, every category of the json is reported (by its json name).
    assert "AP-_background_" in evaluate_coco(coco, {"bbox": dets}, detailed=True, log=lambda m: None)["bbox"]


def test_a_set_without_ground_truth_says_why_its_ap_is_nan():
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 10, "width": 10, "file_name": "a.png"}],
                    "categories": [{"id": 1, "name": "thing"}], "annotations": []}
    coco.createIndex()
    lines = []
    dets = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]
    metrics = evaluate_coco(coco, {"bbox": dets}, log=lines.append)
    assert np.isnan(metrics["bbox"]["AP"])
    assert "the 1 evaluated images have no ground-truth object (crowd regions aside)" in "\n".join(lines)


def test_more_than_100_detections_per_image_are_said_to_be_cut_at_max_dets():
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 100, "width": 100, "file_name": "a.png"}],
                    "categories": [{"id": 1, "name": "thing"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0,
                                     "iscrowd": 0}]}
    coco.createIndex()
    dets = [{"image_id": 1, "category_id": 1, "bbox": [1 + k % 90, 1, 4, 4], "score": 1 - k / 1000}
            for k in range(150)]
    lines = []
    evaluate_coco(coco, {"bbox": dets}, log=lines.append)
    assert "bbox: 1 image(s) have more than 100 detections (up to 150)" in "\n".join(lines)
    lines.clear()
    evaluate_coco(coco, {"bbox": dets[:100]}, log=lines.append)
    assert "more than 100" not in "\n".join(lines)
