import json
import os

import cv2
import numpy as np
import pytest

from maskrcnn.data.catalog import (COCO_SPLITS, ConcatDataset, DatasetCatalog, DatasetSpecError, build_dataset,
                                   split_specs)
from maskrcnn.data.datasets.coco import COCODataset
from maskrcnn.data.datasets.pennfudan import PennFudanDataset
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset


@pytest.fixture
def paths(shared_data):
    return {
        "pennfudan": os.path.join(shared_data, "PennFudanPed-sample"),
        "labelme_json": os.path.join(shared_data, "labelme-coco", "annotations.json"),
        "labelme_root": os.path.join(shared_data, "labelme-coco"),
    }


def _write_coco(folder, split):
    os.makedirs(os.path.join(folder, "coco", "annotations"))
    os.makedirs(os.path.join(folder, "coco", split))
    cv2.imwrite(os.path.join(folder, "coco", split, "1.jpg"), np.zeros((8, 8, 3), np.uint8))
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": 8, "width": 8},
                       {"id": 2, "file_name": "2.jpg", "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9.0,
                             "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}],
            "categories": [{"id": 1, "name": "thing"}]}
    with open(os.path.join(folder, "coco", "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)


def test_synthetic_specs():
    train = build_dataset("synthetic:train", "unused", is_train=True)
    assert isinstance(train, SyntheticShapesDataset) and train.split == "train" and len(train) == 512
    assert build_dataset("synthetic", "unused", is_train=False).split == "val"
    assert build_dataset("synthetic", "unused", is_train=True).split == "train"


def test_pennfudan_specs(paths):
    root = paths["pennfudan"]
    ds = build_dataset(f"pennfudan:{root}:all", "unused", is_train=True)
    assert isinstance(ds, PennFudanDataset) and len(ds) == 40
    assert len(build_dataset(f"pennfudan:{root}", "unused", is_train=False)) == 40   # default test split
    # default train split of the 40-image sample is empty: the error quotes the spec and says what to do
    with pytest.raises(DatasetSpecError, match=r"pennfudan:.*PennFudanPed-sample'.*split='all'"):
        build_dataset(f"pennfudan:{root}", "unused", is_train=True)
    with pytest.raises(DatasetSpecError, match=r"pennfudan:.*:valid'"):
        build_dataset(f"pennfudan:{root}:valid", "unused", is_train=True)


def test_coco_specs(paths):
    a = build_dataset(f"coco:{paths['labelme_json']}", "unused", is_train=False)
    b = build_dataset(f"coco:{paths['labelme_json']}:{paths['labelme_root']}", "unused", is_train=False)
    assert isinstance(a, COCODataset) and len(a) == len(b) == 3
    assert a.image_dir == paths["labelme_root"]
    # cfg DATA_LOADER.MAX_IMAGE_SIDE reaches COCO datasets; 0 or None means full size
    assert a.max_image_side is None
    assert build_dataset(f"coco:{paths['labelme_json']}", "unused", max_image_side=64).max_image_side == 64
    assert build_dataset(f"coco:{paths['labelme_json']}", "unused", max_image_side=0).max_image_side is None
    with pytest.raises(DatasetSpecError, match=r"'coco:/no/such.json'.*annotation file not found"):
        build_dataset("coco:/no/such.json", "unused", is_train=True)
    with pytest.raises(DatasetSpecError, match=r"expected coco:ANN_JSON"):
        build_dataset("coco:", "unused", is_train=True)


def test_comma_joined_and_list_specs(paths):
    both = build_dataset("synthetic:train,synthetic:val", "unused", is_train=True)
    assert isinstance(both, ConcatDataset) and len(both) == 576
    assert both.classes == SyntheticShapesDataset("val").classes
    assert both.get_image_info(520) == SyntheticShapesDataset("val").get_image_info(8)
    assert both.locate(511) == (0, 511) and both.locate(512) == (1, 0)
    assert len(build_dataset(["synthetic:train", "synthetic:val"], "unused", is_train=True)) == 576
    spec = f"synthetic:train,pennfudan:{paths['pennfudan']}:all"
    with pytest.raises(DatasetSpecError, match=r"different classes.*person"):
        build_dataset(spec, "unused", is_train=True)


def test_a_comma_in_a_path_does_not_split_the_spec(tmp_path):
    # "my set, v2" split into "coco:.../my set" and " v2/...", two specs that named no file.
    folder = tmp_path / "my set, v2"
    _write_coco(str(folder), "val2017")
    ann = folder / "coco" / "annotations" / "instances_val2017.json"
    images = folder / "coco" / "val2017"
    ds = build_dataset(f"coco:{ann}:{images}", "unused", is_train=False)
    assert isinstance(ds, COCODataset) and ds.ann_file == str(ann) and len(ds) == 2
    both = build_dataset(f"coco:{ann}:{images}, coco:{ann}:{images}", "unused", is_train=False)
    assert isinstance(both, ConcatDataset) and [len(d) for d in both.datasets] == [2, 2]
    assert split_specs(f"coco:{ann}:{images},synthetic:val, coco_2017_val") == [
        f"coco:{ann}:{images}", "synthetic:val", "coco_2017_val"]
    assert split_specs("coco:a, b.json,pennfudan:/x, y") == ["coco:a, b.json", "pennfudan:/x, y"]
    assert split_specs("synthetic:train, nope") == ["synthetic:train", "nope"]  # then: unknown dataset 'nope'


@pytest.mark.parametrize("spec,match", [
    ("foo:bar", r"'foo:bar'.*unknown kind 'foo'"),
    ("nope", r"unknown dataset 'nope'.*coco_2017_train"),
    ("synthetic:test", r"'synthetic:test'.*synthetic:train or synthetic:val"),
    ("synthetic:train,", r"empty dataset name"),
    ("", r"empty dataset name"),
])
def test_bad_specs(spec, match):
    with pytest.raises(DatasetSpecError, match=match):
        build_dataset(spec, "unused", is_train=True)
    with pytest.raises(DatasetSpecError, match="string or a list"):
        build_dataset(3, "unused", is_train=True)


def test_builtin_coco_names_under_data_dir(tmp_path):
    for name in ("coco_2017_train", "coco_2017_val", "coco_2014_train", "coco_2014_val", "coco_2014_minival"):
        assert name in DatasetCatalog.list()
    assert COCO_SPLITS["coco_2014_minival"] == ("coco/val2014", "coco/annotations/instances_minival2014.json")
    expected = os.path.join(str(tmp_path), "coco/annotations/instances_val2017.json")
    with pytest.raises(DatasetSpecError, match=f"'coco_2017_val' expects {expected}"):
        build_dataset("coco_2017_val", str(tmp_path), is_train=False)
    _write_coco(str(tmp_path), "val2017")
    ds = build_dataset("coco_2017_val", str(tmp_path), is_train=False)
    assert isinstance(ds, COCODataset) and len(ds) == 2
    assert len(build_dataset("coco_2017_val", str(tmp_path), is_train=True, filter_empty=True)) == 1
    # filtering is a training-time choice only
    assert len(build_dataset("coco_2017_val", str(tmp_path), is_train=False, filter_empty=True)) == 2


def test_register_get_list_remove():
    name = "test_catalog_tiny_synthetic"
    calls = []

    def factory():
        calls.append(1)
        return SyntheticShapesDataset("val", num_images=3)

    DatasetCatalog.register(name, factory)
    try:
        assert name in DatasetCatalog.list()
        ds = build_dataset(name, "unused", is_train=True)
        assert len(ds) == 3 and calls == [1]
        assert len(build_dataset(f"{name},synthetic:val", "unused", is_train=True)) == 67
        with pytest.raises(ValueError, match="already taken"):
            DatasetCatalog.register(name, factory)
        with pytest.raises(ValueError, match="already taken"):
            DatasetCatalog.register("coco_2017_train", factory)
        with pytest.raises(ValueError, match="invalid name"):
            DatasetCatalog.register("a:b", factory)
        with pytest.raises(TypeError, match="not callable"):
            DatasetCatalog.register("other_name", 3)
    finally:
        DatasetCatalog.remove(name)
    assert name not in DatasetCatalog.list()
    with pytest.raises(KeyError):
        DatasetCatalog.remove(name)
