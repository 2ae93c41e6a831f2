import json
import os
import warnings

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data.datasets.coco import COCODataset


# ---------------------------------------------------------------------------------------------------------------------
# the real labelme-made json in ../shared/data
@pytest.fixture(scope="module")
def labelme(request):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "labelme-coco")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        pytest.fail(f"shared data not found at {root}")
    ann = os.path.join(root, "annotations.json")
    with open(ann) as f:
        raw = json.load(f)
    return root, ann, raw


def test_labelme_counts_and_category_mapping(labelme):
    root, ann, raw = labelme
    ds = COCODataset(ann, root)
    assert len(ds) == 3 == len(raw["images"])
    fg_cats = sorted((c for c in raw["categories"] if c["name"] != "_background_"), key=lambda c: c["id"])
    assert len(fg_cats) == 20 and len(raw["categories"]) == 21
    assert ds.classes == ["__background__"] + [c["name"] for c in fg_cats]
    assert "_background_" not in ds.classes
    assert sorted(ds.contiguous_to_category_id) == list(range(1, 21))
    assert {v: k for k, v in ds.contiguous_to_category_id.items()} == ds.category_id_to_contiguous

    total = 0
    name_of_cat = {c["id"]: c["name"] for c in raw["categories"]}
    for i in range(len(ds)):
        target = ds.get_target(i)
        info = ds.get_image_info(i)
        anns = sorted((a for a in raw["annotations"] if a["image_id"] == info["id"]), key=lambda a: a["id"])
        total += len(target["labels"])
        # labels name the same categories as the json (the background category must not shift them)
        assert [ds.classes[int(label)] for label in target["labels"]] == [name_of_cat[a["category_id"]] for a in anns]
        assert target["labels"].dtype == torch.int64 and int(target["labels"].min()) >= 1
        assert int(target["image_id"]) == info["id"]
    assert total == len(raw["annotations"]) == 12
    # category ids 1..20 map to themselves once the id-0 background category is skipped (person 15, bottle 5)
    assert ds.get_target(0)["labels"].tolist() == [15, 15, 5]


def test_labelme_multi_polygon_masks_match_pycocotools(labelme):
    root, ann, raw = labelme
    ds = COCODataset(ann, root)
    coco = COCO(ann)
    multi = [a for a in raw["annotations"] if len(a["segmentation"]) > 1]
    assert {a["id"] for a in multi} == {1, 11}
    for a in multi:
        index = ds.ids.index(a["image_id"])
        target = ds.get_target(index)
        ann_ids = sorted(x["id"] for x in raw["annotations"] if x["image_id"] == a["image_id"])
        mask = target["masks"][ann_ids.index(a["id"])].numpy()
        expected = coco.annToMask(coco.anns[a["id"]])
        np.testing.assert_array_equal(mask, expected)
        # every polygon counts: the mask is larger than the first polygon alone
        h, w = mask.shape
        first_only = mask_util.decode(mask_util.frPyObjects([a["segmentation"][0]], h, w))[:, :, 0]
        assert mask.sum() > first_only.sum()
        # area is the annotation's (segmentation) area
        assert float(target["area"][ann_ids.index(a["id"])]) == a["area"]


def test_labelme_boxes_pixels_and_file_resolution(labelme):
    root, ann, raw = labelme
    ds_root = COCODataset(ann, root)
    # image_dir = JPEGImages: "JPEGImages/x.jpg" is not under it, so the json's folder is used instead
    ds_jpeg = COCODataset(ann, os.path.join(root, "JPEGImages"))
    image, target = ds_root[0]
    image2, _ = ds_jpeg[0]
    assert torch.equal(image, image2)
    info = ds_root.get_image_info(0)
    assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
    bgr = cv2.imread(os.path.join(root, info["file_name"]), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), bgr[:, :, ::-1])
    anns = sorted((a for a in raw["annotations"] if a["image_id"] == info["id"]), key=lambda a: a["id"])
    expected = torch.tensor([[x, y, min(x + w, info["width"]), min(y + h, info["height"])]
                             for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
    assert torch.equal(target["boxes"], expected)
    # annotation id 1: bbox [365, 87, 135, 251] ends exactly at the image's right and bottom edges
    assert target["boxes"][1].tolist() == [365.0, 87.0, 500.0, 338.0]
    assert target["masks"].shape == (3, 338, 500) and target["masks"].dtype == torch.uint8
    assert target["iscrowd"].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# a json written by the test: non-contiguous categories, RLE (both forms), crowd, degenerate and clipped boxes
H, W = 20, 30


def _rle_uncompressed(mask):
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


@pytest.fixture
def tiny_coco(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(img_dir / name), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    crowd = np.zeros((H, W), np.uint8)
    crowd[2:9, 20:28] = 1
    rle_mask = np.zeros((H, W), np.uint8)
    rle_mask[10:15, 3:7] = 1
    rle_mask[16:18, 3:5] = 1
    compressed = mask_util.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode("ascii")
    anns = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 8, 5], "area": 40.0, "iscrowd": 0,
         "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 2, 8, 7], "area": 56.0, "iscrowd": 1,
         "segmentation": _rle_uncompressed(crowd)},
        {"id": 12, "image_id": 1, "category_id": 12, "bbox": [3, 10, 4, 8], "area": 24.0, "iscrowd": 0,
         "segmentation": compressed},
        {"id": 13, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 4], "area": 0.0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 9, 5, 5]]},  # zero width
        {"id": 14, "image_id": 1, "category_id": 7, "bbox": [25, 15, 10, 10], "area": 25.0, "iscrowd": 0,
         "segmentation": [[25, 15, 30, 15, 30, 20, 25, 20]]},  # sticks out of the 30x20 image: clipped
        {"id": 15, "image_id": 1, "category_id": 7, "bbox": [1, 1, float("nan"), 2], "area": 1.0, "iscrowd": 0,
         "segmentation": [[1, 1, 2, 1, 2, 2]]},  # non-finite
        {"id": 16, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 1.0, "iscrowd": 0,
         "segmentation": [[1, 1, 2, 2]]},  # a "polygon" of two points
        {"id": 20, "image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 1,
         "segmentation": _rle_uncompressed(np.pad(np.ones((5, 5), np.uint8), ((0, H - 5), (0, W - 5))))},
    ]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W},
                   {"id": 3, "file_name": "c.png", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 0, "name": "_background_"}, {"id": 12, "name": "twelve"}, {"id": 3, "name": "three"},
                       {"id": 7, "name": "seven"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(ann_file), str(img_dir), {"crowd": crowd, "rle": rle_mask}


def test_tiny_json_categories_rle_crowd_and_dropped_annotations(tiny_coco):
    ann_file, img_dir, masks = tiny_coco
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = COCODataset(ann_file, img_dir)
    messages = [str(w.message) for w in caught]
    for bad_id in (13, 15, 16):
        assert any(f"annotation id {bad_id} " in m for m in messages), (bad_id, messages)
    # one warning for all of them; 10 is fine and 14 is kept (clipped, reported as such)
    assert len(messages) == 1
    assert "annotation id 10 " not in messages[0]
    assert "box_clipped: 1" in messages[0] and "annotation id 14 " in messages[0]
    assert {p.ann_id: p.kind for p in ds.annotation_problems} == {
        13: "degenerate_box", 14: "box_clipped", 15: "nonfinite_box", 16: "short_polygon"}

    assert ds.classes == ["__background__", "three", "seven", "twelve"]
    assert ds.contiguous_to_category_id == {1: 3, 2: 7, 3: 12}
    assert ds.ids == [1, 2, 3]
    image, t = ds[0]
    assert image.shape == (3, H, W)
    assert t["labels"].tolist() == [2, 1, 3, 2]   # annotations 10, 11, 12, 14
    assert t["iscrowd"].tolist() == [0, 1, 0, 0]
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (4, 4)
    assert t["boxes"].tolist() == [[2, 3, 10, 8], [20, 2, 28, 9], [3, 10, 7, 18], [25, 15, 30, 20]]
    assert t["area"].tolist() == [40.0, 56.0, 24.0, 25.0]
    assert t["image_id"].dtype == torch.int64 and int(t["image_id"]) == 1
    assert t["masks"].shape == (4, H, W) and t["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(t["masks"][1].numpy(), masks["crowd"])   # uncompressed RLE, crowd kept
    np.testing.assert_array_equal(t["masks"][2].numpy(), masks["rle"])     # compressed RLE
    coco = COCO(ann_file)
    np.testing.assert_array_equal(t["masks"][0].numpy(), coco.annToMask(coco.anns[10]))
    np.testing.assert_array_equal(t["masks"][3].numpy(), coco.annToMask(coco.anns[14]))

    # image 2 has no annotations: empty but well-formed target
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["masks"].shape == (0, H, W) and t2["labels"].shape == (0,)


def test_tiny_json_remove_images_without_annotations(tiny_coco):
    ann_file, img_dir, _ = tiny_coco
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = COCODataset(ann_file, img_dir, remove_images_without_annotations=True)
    # image 2 has nothing, image 3 only a crowd region
    assert ds.ids == [1]
    assert ds.get_image_info(0) == {"file_name": "a.png", "height": H, "width": W, "id": 1}


def test_tiny_json_errors_name_file_and_image(tiny_coco, tmp_path):
    ann_file, img_dir, _ = tiny_coco
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = COCODataset(ann_file, img_dir)
        os.remove(os.path.join(img_dir, "b.png"))
        with pytest.raises(FileNotFoundError, match=r"'b.png' of image id 2"):
            ds[1]
        with open(os.path.join(img_dir, "c.png"), "wb") as f:
            f.write(b"not an image")
        with pytest.raises(OSError, match=r"c\.png"):
            ds[2]
        cv2.imwrite(os.path.join(img_dir, "a.png"), np.zeros((H + 1, W, 3), np.uint8))
        with pytest.raises(ValueError, match=r"a\.png \(image id 1\) is 21x30"):
            ds[0]
    with pytest.raises(FileNotFoundError, match="annotation file"):
        COCODataset(str(tmp_path / "missing.json"), img_dir)


@pytest.mark.parametrize("segmentation", [None, [], [2, 3, 10, 3, 10, 8, 2, 8]])
def test_a_json_whose_every_object_is_dropped_is_refused(tiny_coco, tmp_path, segmentation):
    # Box-only annotations (no segmentation, an empty one, or a flat list instead of a list of polygons) are
    # dropped; when nothing is left, training would run on no object at all: an error names the file and why.
    ann_file, img_dir, _ = tiny_coco
    data = json.loads(open(ann_file).read())
    for ann in data["annotations"]:
        ann["iscrowd"] = 0
        if segmentation is None:
            ann.pop("segmentation")
        else:
            ann["segmentation"] = segmentation
    bad = tmp_path / "boxes_only.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotation\\(s\\) were dropped, no object is left") as e:
        COCODataset(str(bad), img_dir)
    assert str(bad) in str(e.value)
    if isinstance(segmentation, list) and segmentation:
        assert "flat list" in str(e.value)


def test_annotations_without_or_sharing_an_id_are_numbered_for_the_evaluation(tmp_path):
    # pycocotools indexes the ground truth by annotation id: a missing id failed the evaluation after the whole
    # inference, and two objects sharing an id lost one of them (its detection then scored as a false positive).
    from maskrcnn.evaluation.coco import coco_gt_from_dataset, evaluate_coco

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    cv2.imwrite(str(img_dir / "a.png"), np.zeros((60, 80, 3), np.uint8))
    boxes = [[5, 5, 20, 20], [40, 10, 30, 25], [10, 35, 25, 20]]
    anns = [{"image_id": 1, "category_id": 1, "bbox": b, "area": float(b[2] * b[3]), "iscrowd": 0,
             "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
            for b in boxes]
    anns[0]["id"], anns[1]["id"] = 7, 7  # the third has none
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 60, "width": 80}],
                                    "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    ds = COCODataset(str(ann_file), str(img_dir))
    with pytest.warns(UserWarning, match="1 annotation\\(s\\) without an 'id' and 1 with the id of an earlier one"):
        gt = coco_gt_from_dataset(ds)
    assert sorted(gt.anns) == [7, 8, 9]
    assert gt.anns[7]["bbox"] == boxes[0]  # the first holder of an id keeps it
    assert json.loads(ann_file.read_text())["annotations"][2].get("id") is None  # the user's file is not touched
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9} for b in boxes]
    metrics = evaluate_coco(gt, {"bbox": dets}, log=lambda *_: None)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)


def test_box_masks_keeps_box_only_annotations_with_their_box_as_the_mask(tiny_coco, tmp_path):
    # For a model without a mask head (the tools pass box_masks=not MODEL.MASK_ON): a box-only annotation is an
    # object whose mask is its (clipped) box; annotations with a segmentation keep theirs.
    ann_file, img_dir, masks = tiny_coco
    data = json.loads(open(ann_file).read())
    for ann in data["annotations"]:
        if ann["id"] in (10, 14):
            ann.pop("segmentation")
    data["annotations"][2]["segmentation"] = []  # id 12: an empty list, also box-only
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no object is left .*box-only annotations train a box-only model: "
                                         "MODEL.MASK_ON False"):
        COCODataset(str(partial), img_dir)  # only the crowd region 11 is left for a mask model
    with pytest.warns(UserWarning):  # 13, 15 and 16 are still dropped
        kept = COCODataset(str(partial), img_dir, box_masks=True)
    assert [r["id"] for r in kept.records(0)] == [10, 11, 12, 14]
    _, target = kept[0]
    expected = np.zeros((4, H, W), np.uint8)
    expected[0, 3:8, 2:10] = 1          # bbox [2, 3, 8, 5]
    expected[1] = masks["crowd"]        # its own segmentation
    expected[2, 10:18, 3:7] = 1         # bbox [3, 10, 4, 8]
    expected[3, 15:20, 25:30] = 1       # bbox [25, 15, 10, 10] clipped to the 30x20 image
    np.testing.assert_array_equal(target["masks"].numpy(), expected)
    np.testing.assert_allclose(target["boxes"].numpy()[[0, 2, 3]], [[2, 3, 10, 8], [3, 10, 7, 18], [25, 15, 30, 20]])


def test_string_image_ids_are_named_as_such_and_get_no_segmentation_hint(tiny_coco, tmp_path):
    # Every annotation's image_id written as a string: all dropped as missing_image, and the headline used to
    # suggest MODEL.MASK_ON False, which was not the problem.
    ann_file, img_dir, _ = tiny_coco
    data = json.loads(open(ann_file).read())
    for ann in data["annotations"]:
        ann["image_id"] = str(ann["image_id"])
    bad = tmp_path / "string_ids.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no object is left:") as e:
        COCODataset(str(bad), img_dir)
    assert "image id '1' is not in 'images' (a string: 'images' has the integer 1" in str(e.value)
    assert "MASK_ON" not in str(e.value)


def test_categories_sharing_a_name_are_warned_about(tiny_coco, tmp_path):
    ann_file, img_dir, _ = tiny_coco
    data = json.loads(open(ann_file).read())
    for cat in data["categories"]:
        if cat["id"] in (3, 7):
            cat["name"] = "thing"
    dup = tmp_path / "dup_names.json"
    dup.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:  # the fixture's bad annotations warn too
        warnings.simplefilter("always")
        ds = COCODataset(str(dup), img_dir)
    assert any("categories share a name: 'thing' for ids [3, 7]" in str(w.message) for w in caught)
    assert ds.classes == ["__background__", "thing", "thing", "twelve"]  # still separate classes, ids ascending
