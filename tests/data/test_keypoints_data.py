"""COCO keypoints in COCODataset targets, and the horizontal flip swapping left/right keypoints."""
import json

import numpy as np
import pytest
import torch

from maskrcnn.data.datasets.coco import COCODataset
from maskrcnn.data.transforms import RandomHorizontalFlip, hflip, keypoint_flip_indices

NAMES = ["nose", "left_eye", "right_eye", "left_ankle", "right_ankle"]


def test_flip_indices_from_names():
    assert keypoint_flip_indices(NAMES).tolist() == [0, 2, 1, 4, 3]


def test_hflip_mirrors_and_swaps():
    image = torch.zeros(3, 10, 20)
    kps = torch.tensor([[[5.0, 1.0, 2], [2.0, 3.0, 2], [8.0, 3.0, 1], [0.0, 0.0, 0], [4.0, 9.0, 2]]])
    _, t = hflip(image, {"keypoints": kps}, keypoint_flip_indices(NAMES))
    # the new left eye is the mirrored right eye: x' = W - x
    assert t["keypoints"][0].tolist() == [[15.0, 1.0, 2], [12.0, 3.0, 1], [18.0, 3.0, 2], [16.0, 9.0, 2],
                                          [20.0, 0.0, 0]]
    with pytest.raises(ValueError, match="keypoint_flip"):
        hflip(image, {"keypoints": kps})
    _, twice = hflip(*hflip(image, {"keypoints": kps}, keypoint_flip_indices(NAMES)), keypoint_flip_indices(NAMES))
    assert torch.equal(twice["keypoints"], kps)
    _, always = RandomHorizontalFlip(1.0, keypoint_flip_indices(NAMES))(image, {"keypoints": kps})
    assert torch.equal(always["keypoints"], t["keypoints"])


def test_coco_dataset_keypoints(tmp_path):
    import cv2
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 60, 3), np.uint8))
    kp = [10, 12, 2, 8, 10, 1, 12, 10, 2, 0, 0, 0, 11, 35, 2]
    ann = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
           "categories": [{"id": 1, "name": "person", "keypoints": NAMES, "skeleton": [[1, 2]]}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 32], "area": 640, "iscrowd": 0,
                "segmentation": [[5, 5, 25, 5, 25, 37, 5, 37]], "keypoints": kp, "num_keypoints": 4},
               {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 5, 20, 20], "area": 400, "iscrowd": 0,
                "segmentation": [[30, 5, 50, 5, 50, 25, 30, 25]]}]}
    path = tmp_path / "kps.json"
    path.write_text(json.dumps(ann))
    ds = COCODataset(str(path), str(tmp_path))
    assert ds.num_keypoints == 5 and ds.keypoint_flip_indices.tolist() == [0, 2, 1, 4, 3]
    _, target = ds[0]
    assert target["keypoints"].shape == (2, 5, 3)
    assert target["keypoints"][0].flatten().tolist() == [float(v) for v in kp]
    assert target["keypoints"][1].abs().sum() == 0  # no keypoints: all invisible
    # resized output (max_image_side path): keypoints scale with the image
    t2 = ds.get_target(0, size=(20, 30))
    assert torch.allclose(t2["keypoints"][0, 0], torch.tensor([5.0, 6.0, 2.0]))
