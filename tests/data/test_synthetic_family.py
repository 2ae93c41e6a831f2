"""The synthetic family: every variant follows the dataset contract, is deterministic, draws what its spec says
(sizes, classes incl. thin/hollow/concave shapes, crowds, empty images, class-independent colours), is reachable by
spec and catalog name, and exports to COCO json that reads back exactly."""
import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from maskrcnn.data.catalog import DatasetCatalog, DatasetSpecError, build_dataset
from maskrcnn.data.datasets.synthetic_family import (FAMILY_SHAPES, VARIANTS, SyntheticFamilyDataset, shape_mask,
                                                     variant_names)
from maskrcnn.data.export_coco import export_coco


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_contract_and_spec(name):
    spec = VARIANTS[name]
    ds = SyntheticFamilyDataset(name, "train", num_images=12)
    assert ds.classes == ["__background__"] + list(spec.classes)
    for i in range(len(ds)):
        image, t = ds[i]
        info = ds.get_image_info(i)
        _, h, w = image.shape
        assert (info["height"], info["width"]) == (h, w)
        assert spec.height[0] <= h <= spec.height[1] and spec.width[0] <= w <= spec.width[1]
        if spec.square:
            assert h == w
        assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.uint8
        assert t["iscrowd"].shape == (n,) and t["area"].shape == (n,)
        if n:
            assert 1 <= int(t["labels"].min()) and int(t["labels"].max()) <= len(spec.classes)
            assert int(t["masks"].flatten(1).sum(1).min()) > 0
            # tight boxes of the visible masks; visible parts never overlap (occlusion paints over)
            assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
            assert int(t["masks"].sum(0).max()) <= 1
            assert torch.equal(t["area"], t["masks"].flatten(1).sum(1).float())


def test_deterministic_and_distinct_streams():
    a, b = SyntheticFamilyDataset("tiny", "train"), SyntheticFamilyDataset("tiny", "train")
    torch.manual_seed(5)
    np.random.seed(5)
    for i in (9, 2):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1]["masks"], b[i][1]["masks"])
    assert not torch.equal(a[2][0], SyntheticFamilyDataset("tiny", "val")[2][0])
    assert a[2][0].shape != SyntheticFamilyDataset("wide", "train")[2][0].shape


def test_family_covers_sizes_shapes_crowds_and_empty_images():
    sides = [min(SyntheticFamilyDataset(v, "train").get_image_info(i)["height"],
                 SyntheticFamilyDataset(v, "train").get_image_info(i)["width"]) for v in VARIANTS for i in range(20)]
    assert min(sides) <= 128 and max(max(v.height[1], v.width[1]) for v in VARIANTS.values()) == 512
    assert {len(v.classes) for v in VARIANTS.values()} >= {3, 10}
    used = set().union(*(v.classes for v in VARIANTS.values()))
    assert {"bar", "ring", "frame", "lshape", "star", "crescent"} <= used and used <= set(FAMILY_SHAPES)
    tiny = SyntheticFamilyDataset("tiny", "train", num_images=10)
    sizes = torch.cat([tiny[i][1]["area"] for i in range(10)]).sqrt()
    assert float(sizes.min()) <= 5.0  # a few pixels
    large = SyntheticFamilyDataset("large", "train", num_images=20)
    rel = [float(t["area"].max().sqrt()) / min(im.shape[1:]) for im, t in (large[i] for i in range(20))]
    assert max(rel) > 0.6  # most of the image
    crowd = SyntheticFamilyDataset("crowd", "train", num_images=40)
    targets = [crowd[i][1] for i in range(40)]
    assert sum(int(t["iscrowd"].sum()) for t in targets) >= 10
    assert sum(len(t["labels"]) == 0 for t in targets) >= 1
    assert variant_names(held_out=True) == ["ten", "mixed", "wide"]
    assert set(variant_names(held_out=False)) | set(variant_names(held_out=True)) == set(VARIANTS)


def test_thin_hollow_concave_shapes():
    ring = shape_mask("ring", 0, 0, 40, 40, 40, 40, 0)
    assert ring[20, 20] == 0 and ring[20, 1] == 1  # hollow
    frame = shape_mask("frame", 0, 0, 30, 30, 30, 30, 0)
    assert frame[15, 15] == 0 and frame[0, 15] == 1
    lshape = shape_mask("lshape", 0, 0, 30, 30, 30, 30, 0)
    assert lshape[2, 28] == 0 and lshape[28, 28] == 1 and lshape[2, 2] == 1  # a corner cut out: concave
    star = shape_mask("star", 0, 0, 41, 41, 41, 41, 0)
    assert star.sum() < 0.5 * 41 * 41 and star[20, 20] == 1
    bar = shape_mask("bar", 0, 0, 40, 40, 40, 40, 2)  # diagonal
    assert bar.sum() < 0.25 * 40 * 40 and bar[0, 0] == 1 and bar[39, 39] == 1 and bar[0, 39] == 0
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("blob", 0, 0, 5, 5, 5, 5, 0)


def test_colour_does_not_give_the_class_away():
    ds = SyntheticFamilyDataset("basic", "train", num_images=60)
    colours = {}
    for i in range(60):
        image, t = ds[i]
        for m, label in zip(t["masks"], t["labels"].tolist()):
            colours.setdefault(label, []).append(image[:, m.bool()].mean(1))
    assert len(colours) == 3
    for label, cs in colours.items():
        spread = torch.stack(cs).std(0)
        assert float(spread.mean()) > 0.15, (label, spread)  # every class in many colours


def test_specs_catalog_names_and_errors():
    ds = build_dataset("synthetic:thin:val", "unused")
    assert isinstance(ds, SyntheticFamilyDataset) and ds.split == "val" and ds.spec.name == "thin"
    assert build_dataset("synthetic:thin", "unused", is_train=True).split == "train"
    assert build_dataset("synthetic:thin", "unused", is_train=False).split == "val"
    assert build_dataset("synthetic:train", "unused").__class__.__name__ == "SyntheticShapesDataset"
    assert "synthetic_wide_train" in DatasetCatalog.list()
    assert build_dataset("synthetic_wide_val", "unused").spec.name == "wide"
    with pytest.raises(DatasetSpecError, match="synthetic:VARIANT.*'basic'"):
        build_dataset("synthetic:nope:train", "unused")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        SyntheticFamilyDataset("nope")


def test_export_coco_reads_back_exactly(tmp_path):
    ds = SyntheticFamilyDataset("crowd", "train", num_images=8)
    path = export_coco(ds, str(tmp_path))
    coco = build_dataset(f"coco:{path}:{tmp_path}/images", "unused")
    assert coco.classes == ds.classes and len(coco) == 8
    crowds = 0
    for i in range(8):
        a, ta = coco[i]
        b, tb = ds[i]
        assert float((a - b).abs().max()) <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
        for k in ("boxes", "labels", "masks", "iscrowd", "area"):
            assert torch.equal(ta[k].to(tb[k].dtype), tb[k]), k
        crowds += int(tb["iscrowd"].sum())
    assert crowds >= 1
