import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import masks_to_boxes

from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.data.transforms import (Compose, RandomHorizontalFlip, ResizeShortestEdge, hflip, read_image_rgb,
                                      to_float_tensor)

ONE = torch.tensor([0.0, 0.0, 1.0, 1.0])


def _tight_boxes(masks):
    return masks_to_boxes(masks) + ONE


@pytest.fixture
def item():
    return SyntheticShapesDataset("train", image_size=(48, 80), num_images=4, seed=2)[1]


def test_flip_hand_example():
    image = torch.zeros(3, 4, 10)
    masks = torch.zeros(1, 4, 10, dtype=torch.uint8)
    masks[0, 1:3, 3:8] = 1  # columns 3..7
    target = {"boxes": torch.tensor([[3.0, 1.0, 8.0, 3.0]]), "masks": masks, "labels": torch.tensor([2])}
    image[0, 0, 0] = 1.0
    out_image, out = hflip(image, target)
    assert out["boxes"].tolist() == [[2.0, 1.0, 7.0, 3.0]]   # columns 2..6 = 9-7 .. 9-3
    assert out["masks"][0, 1].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert float(out_image[0, 0, 9]) == 1.0
    assert out["labels"] is target["labels"]
    assert target["boxes"].tolist() == [[3.0, 1.0, 8.0, 3.0]]  # input untouched


def test_flip_twice_is_identity_and_boxes_follow_masks(item):
    image, target = item
    assert torch.equal(target["boxes"], _tight_boxes(target["masks"]))
    once_image, once = hflip(image, target)
    assert torch.equal(once["boxes"], _tight_boxes(once["masks"]))
    assert not torch.equal(once_image, image)
    twice_image, twice = hflip(once_image, once)
    assert torch.equal(twice_image, image)
    assert torch.equal(twice["boxes"], target["boxes"])
    assert torch.equal(twice["masks"], target["masks"])


def test_random_flip_probability_and_generator(item):
    image, target = item
    never, always, half = RandomHorizontalFlip(0.0), RandomHorizontalFlip(1.0), RandomHorizontalFlip(0.5)
    assert torch.equal(never(image, target)[0], image)
    assert torch.equal(always(image, target)[1]["boxes"], hflip(image, target)[1]["boxes"])

    def flipped(seed):
        out, _ = half(image, target, generator=torch.Generator().manual_seed(seed))
        return not torch.equal(out, image)

    decisions = [flipped(s) for s in range(200)]
    assert decisions == [flipped(s) for s in range(200)]
    assert 70 < sum(decisions) < 130
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(1.5)


def test_resize_matches_torchvision_transform(item):
    image, target = item
    resize = ResizeShortestEdge((96,), 150)
    out_image, out = resize(image, target)
    tv = GeneralizedRCNNTransform(min_size=96, max_size=150, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    tv_image, tv_target = tv.resize(image, {k: v.clone() for k, v in target.items()})
    assert out_image.shape == tv_image.shape == (3, 90, 150)   # 48x80 -> capped by the long side
    assert torch.allclose(out_image, tv_image)
    assert torch.allclose(out["boxes"], tv_target["boxes"])
    assert torch.equal(out["masks"], tv_target["masks"])
    assert out["masks"].dtype == torch.uint8
    assert torch.equal(out["area"], out["masks"].flatten(1).sum(1).float())
    # a random choice among sizes uses the generator
    multi = ResizeShortestEdge((32, 64, 96), 1000)
    sizes = {multi(image, None, generator=torch.Generator().manual_seed(s))[0].shape[-2] for s in range(20)}
    assert sizes == {32, 64, 96}


def test_compose_passes_generator_and_empty_targets():
    calls = []

    def spy(image, target, generator=None):
        calls.append(generator)
        return image, target

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 10, 20)
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 10, 20, dtype=torch.uint8)}
    out_image, out = Compose([spy, RandomHorizontalFlip(1.0), ResizeShortestEdge(20, 100), spy])(image, empty, g)
    assert calls == [g, g]
    assert out_image.shape == (3, 20, 40) and out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 20, 40)
    with pytest.raises(TypeError, match=r"transforms\[0\]"):
        Compose([3])


def test_read_image_helpers(tmp_path):
    bgr = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, bgr)
    rgb = read_image_rgb(path)
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])
    t = to_float_tensor(rgb)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert torch.equal((t * 255).round().to(torch.uint8), torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_rgb(str(tmp_path / "missing.png"))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(OSError, match="bad.jpg"):
        read_image_rgb(str(tmp_path / "bad.jpg"))
