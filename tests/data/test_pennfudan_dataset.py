import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from maskrcnn.data.datasets.pennfudan import PennFudanDataset, png_size


@pytest.fixture
def root(shared_data):
    return os.path.join(shared_data, "PennFudanPed-sample")


def test_splits_follow_the_last_num_test_rule(root):
    names = sorted(os.listdir(os.path.join(root, "PNGImages")))
    assert len(names) == 40
    full = PennFudanDataset(root, split="all")
    assert len(full) == 40
    # default num_test=50 > 40 images: everything is test, train is empty (an error)
    assert len(PennFudanDataset(root, split="test")) == 40
    with pytest.raises(ValueError, match=r"split 'train' .* is empty .*split='all'"):
        PennFudanDataset(root, split="train")
    train = PennFudanDataset(root, split="train", num_test=10)
    test = PennFudanDataset(root, split="test", num_test=10)
    assert len(train) == 30 and len(test) == 10
    assert [os.path.basename(train.get_image_info(i)["file_name"]) for i in range(30)] == names[:30]
    assert [os.path.basename(test.get_image_info(i)["file_name"]) for i in range(10)] == names[30:]
    # image ids are positions in the full sorted list, whatever the split
    assert [test.get_image_info(i)["id"] for i in range(10)] == list(range(30, 40))
    assert int(test.get_target(0)["image_id"]) == 30
    with pytest.raises(ValueError, match="split"):
        PennFudanDataset(root, split="val")


@pytest.mark.parametrize("name,count", [("FudanPed00001", 2), ("PennPed00019", 7), ("PennPed00020", 3)])
def test_hand_verified_instances_and_boxes(root, name, count):
    ds = PennFudanDataset(root, split="all")
    index = [os.path.basename(ds.get_image_info(i)["file_name"]) for i in range(len(ds))].index(name + ".png")
    image, target = ds[index]

    # independent path: the mask through OpenCV as grey levels, boxes with np.where
    ids = cv2.imread(os.path.join(root, "PedMasks", name + "_mask.png"), cv2.IMREAD_GRAYSCALE)
    instance_ids = [v for v in np.unique(ids) if v != 0]
    assert len(instance_ids) == count
    expected_boxes = []
    for v in instance_ids:
        ys, xs = np.where(ids == v)
        expected_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert target["boxes"].tolist() == expected_boxes
    assert target["labels"].tolist() == [1] * count
    assert target["iscrowd"].tolist() == [0] * count
    assert target["area"].tolist() == [float((ids == v).sum()) for v in instance_ids]
    for k, v in enumerate(instance_ids):
        np.testing.assert_array_equal(target["masks"][k].numpy(), (ids == v).astype(np.uint8))
    # torchvision's masks_to_boxes uses inclusive x2/y2
    assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0]))

    assert image.dtype == torch.float32 and image.shape == (3,) + ids.shape
    bgr = cv2.imread(os.path.join(root, "PNGImages", name + ".png"), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), bgr[:, :, ::-1])


def test_image_info_sizes_without_decoding(root):
    ds = PennFudanDataset(root, split="all")
    for i in range(len(ds)):
        info = ds.get_image_info(i)
        with Image.open(os.path.join(root, info["file_name"])) as im:
            assert (info["width"], info["height"]) == im.size
    assert ds.classes == ["__background__", "person"]


def test_palette_masks_keep_instance_ids(tmp_path):
    # The database's masks can be palette PNGs; the pixel values (palette indices) are the instance ids.
    (tmp_path / "PNGImages").mkdir()
    (tmp_path / "PedMasks").mkdir()
    cv2.imwrite(str(tmp_path / "PNGImages" / "X00001.png"), np.full((12, 16, 3), 90, np.uint8))
    ids = np.zeros((12, 16), np.uint8)
    ids[1:5, 2:6] = 1
    ids[6:11, 9:15] = 2
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    pal.save(str(tmp_path / "PedMasks" / "X00001_mask.png"))
    ds = PennFudanDataset(str(tmp_path), split="all")
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2, 1, 6, 5], [9, 6, 15, 11]]
    assert target["area"].tolist() == [16.0, 30.0]
    assert png_size(str(tmp_path / "PedMasks" / "X00001_mask.png")) == (12, 16)

    os.remove(str(tmp_path / "PedMasks" / "X00001_mask.png"))
    with pytest.raises(FileNotFoundError, match="X00001_mask.png"):
        PennFudanDataset(str(tmp_path), split="all")
    with pytest.raises(FileNotFoundError, match="PNGImages"):
        PennFudanDataset(str(tmp_path / "nowhere"), split="all")
