"""The packed annotation index of COCODataset returns exactly the records of the straightforward parse, on a json
made by the COCO-scale generator (benchmarks/coco_json.py) at a small size."""
import importlib.util
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data.datasets.coco import COCODataset
from maskrcnn.data.datasets.coco_index import PackedAnnotationIndex

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _generator():
    spec = importlib.util.spec_from_file_location("coco_json", os.path.join(ROOT, "benchmarks", "coco_json.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _straightforward(ds: COCODataset, data):
    """Image id -> records, parsed one annotation dict at a time (what COCODataset held before packing)."""
    infos = {im["id"]: im for im in data["images"]}
    out = {img_id: [] for img_id in sorted(infos)}
    for ann in data["annotations"]:  # json order within each image
        if ann.get("image_id") in infos:
            r = ds._parse_annotation(ann, infos[ann["image_id"]])
            if r is not None:
                out[ann["image_id"]].append(r)
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    data = _generator().make_coco_json(60, 450, seed=3)
    # corner cases the generator does not make: no area, no id, a 3-decimal coordinate (float64 storage),
    # a dropped box, an image holding only a crowd region
    anns = data["annotations"]
    del anns[0]["area"]
    del anns[1]["id"]
    crowd_img = next(a["image_id"] for a in anns if a["iscrowd"])
    data["annotations"] = [a for a in anns if a["image_id"] != crowd_img or a["iscrowd"]]
    anns = data["annotations"]
    anns[2]["bbox"][2] = 0.0
    path = tmp_path_factory.mktemp("gen") / "ann.json"
    path.write_text(json.dumps(data))
    data3 = json.loads(json.dumps(data))
    poly = next(a for a in data3["annotations"] if isinstance(a["segmentation"], list))
    poly["segmentation"][0][0] += 0.001
    path3 = path.parent / "ann3.json"
    path3.write_text(json.dumps(data3))
    return str(path), data, str(path3), data3, crowd_img


def _load(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = COCODataset(path, os.path.dirname(path))
    return ds, [str(w.message) for w in caught]


@pytest.mark.parametrize("which", ["two_decimals", "three_decimals"])
def test_packed_records_equal_straightforward(generated, which):
    path, data, path3, data3, _ = generated
    if which == "three_decimals":
        path, data = path3, data3
    ds, messages = _load(path)
    assert len(messages) == 1 and "degenerate_box: 1" in messages[0]
    assert ds._index.coords.dtype == (np.int32 if which == "two_decimals" else np.float64)
    ref = _straightforward(ds, data)
    assert ds.ids == sorted(im["id"] for im in data["images"])
    kinds = set()
    for i, img_id in enumerate(ds.ids):
        records = ds.records(i)
        assert records == ref[img_id], img_id
        for r in records:
            assert type(r["box"]) is tuple and all(type(v) is float for v in r["box"])
            kinds.add("poly" if isinstance(r["segmentation"], list) else type(r["segmentation"]["counts"]).__name__)
    assert kinds == {"poly", "list", "str"}  # polygons, uncompressed (crowd) and compressed RLE
    assert sum(len(r) for r in ref.values()) == ds._index.num_annotations == len(data["annotations"]) - 1


def test_generated_targets_match_pycocotools(generated):
    path, data, *_ = generated
    ds, _ = _load(path)
    filled = json.loads(json.dumps(data))
    for k, a in enumerate(filled["annotations"]):
        a.setdefault("id", 10 ** 6 + k)  # pycocotools' index needs every id
    coco = COCO()
    coco.dataset = filled
    coco.createIndex()
    for i in range(0, len(ds), 7):
        t = ds.get_target(i)
        anns = [a for a in data["annotations"] if a["image_id"] == ds.ids[i] and a["bbox"][2] > 0]
        assert t["labels"].numel() == len(anns)
        for k, a in enumerate(anns):
            np.testing.assert_array_equal(t["masks"][k].numpy(), coco.annToMask(a))
            assert t["iscrowd"][k].item() == a["iscrowd"]
            area = a["area"] if "area" in a else float(t["masks"][k].sum())
            assert t["area"][k].item() == pytest.approx(area, rel=1e-6)


def test_remove_images_without_annotations_and_pickle(generated):
    path, data, _, _, crowd_img = generated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = COCODataset(path, os.path.dirname(path), remove_images_without_annotations=True)
    ref = _straightforward(ds, data)
    assert ds.ids == [i for i in sorted(ref) if any(not r["iscrowd"] for r in ref[i])]
    assert crowd_img in ref and crowd_img not in ds.ids
    # the pycocotools index (read lazily, for evaluation) needs every annotation id: those without one get new ids
    with pytest.warns(UserWarning, match=r"ann\.json\): 1 annotation\(s\) without an 'id'"):
        coco = ds.coco
    assert len(coco.anns) == len(data["annotations"])
    # spawn-started workers get the arrays, not the pycocotools object
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._coco is None and isinstance(clone._index, PackedAnnotationIndex)
    assert [clone.records(i) for i in range(len(clone))] == [ds.records(i) for i in range(len(ds))]
    assert torch.equal(clone.get_target(0)["masks"], ds.get_target(0)["masks"])


def test_generator_is_deterministic_and_file_equals_dict(tmp_path):
    gen = _generator()
    data = gen.make_coco_json(20, 150, seed=5)
    size = gen.write_coco_json(str(tmp_path / "g.json"), 20, 150, seed=5)
    assert size == os.path.getsize(tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text()) == data
    ds, messages = _load(str(tmp_path / "g.json"))
    assert messages == [] and ds._index.num_annotations == 150
    assert ds._coco is None and isinstance(ds.coco, COCO) and len(ds.coco.anns) == 150  # read on first use
    assert pickle.loads(pickle.dumps(ds))._coco is None
    bbox, segm = gen.make_detections(data, 30, seed=1)
    assert len(bbox) == len(segm) and len(bbox) > 0.9 * 20 * 30
    per_image = {}
    for d in bbox:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= 30


def test_bad_ids_are_named(tmp_path):
    base = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": "a1", "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                             "segmentation": [[1, 1, 4, 1, 4, 4]], "area": 4.5, "iscrowd": 0}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"a\.json: annotation id 'a1' \(image id 1\) must be an integer"):
        COCODataset(str(path), str(tmp_path))
    base["annotations"] = []
    base["images"].append(dict(base["images"][0], file_name="b.png"))
    path.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"image id 1 appears twice in 'images' \('a.png' and 'b.png'\)"):
        COCODataset(str(path), str(tmp_path))
