import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.modeling.preprocess import ImageList, Preprocessor

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _pair(min_size=(96,), max_size=160):
    ours = Preprocessor(min_size, max_size, MEAN, STD, pixel_order="RGB", pixel_scale=1.0)
    tv = GeneralizedRCNNTransform(min_size, max_size, MEAN, STD)
    return ours, tv


@pytest.mark.parametrize("sizes", [[(3, 60, 80)], [(3, 100, 70), (3, 64, 64), (3, 33, 190)]])
def test_eval_batch_equals_torchvision(sizes):
    ours, tv = _pair()
    ours.eval(), tv.eval()
    images = [torch.rand(s) for s in sizes]
    a, _ = ours(images)
    b, _ = tv(images)
    assert isinstance(a, ImageList)
    assert a.image_sizes == [tuple(s) for s in b.image_sizes]
    assert a.tensors.shape == b.tensors.shape
    assert a.tensors.shape[-1] % 32 == 0 and a.tensors.shape[-2] % 32 == 0
    torch.testing.assert_close(a.tensors, b.tensors, rtol=0, atol=1e-6)


def test_train_targets_equal_torchvision():
    ours, tv = _pair((80,), 200)
    ours.train(), tv.train()
    img = torch.rand(3, 50, 70)
    masks = torch.zeros(2, 50, 70, dtype=torch.uint8)
    masks[0, 5:20, 10:30] = 1
    masks[1, 30:45, 40:69] = 1
    tgt = {"boxes": torch.tensor([[10.0, 5, 30, 20], [40, 30, 69, 45]]), "labels": torch.tensor([1, 2]),
           "masks": masks}
    a, ta = ours([img], [tgt])
    b, tb = tv([img], [{k: v.clone() for k, v in tgt.items()}])
    torch.testing.assert_close(a.tensors, b.tensors, rtol=0, atol=1e-6)
    torch.testing.assert_close(ta[0]["boxes"], tb[0]["boxes"])
    assert torch.equal(ta[0]["masks"], tb[0]["masks"])
    assert torch.equal(tgt["boxes"], torch.tensor([[10.0, 5, 30, 20], [40, 30, 69, 45]]))  # input untouched


def test_bgr255_detectron_normalisation():
    p = Preprocessor((32,), 64, [102.9801, 115.9465, 122.7717], [1.0, 1.0, 1.0], pixel_order="BGR",
                     pixel_scale=255.0).eval()
    img = torch.rand(3, 32, 32)
    out, _ = p([img])
    expected = img.flip(0) * 255.0 - torch.tensor([102.9801, 115.9465, 122.7717])[:, None, None]
    torch.testing.assert_close(out.tensors[0], expected)
    assert out.scales == [1.0]
    torch.testing.assert_close(out.im_info, torch.tensor([[32.0, 32.0, 1.0]]))


def test_max_size_caps_the_long_side_and_scales_recorded():
    p = Preprocessor((100,), 150, MEAN, STD).eval()
    out, _ = p([torch.rand(3, 50, 200)])
    h, w = out.image_sizes[0]
    assert w == 150 and h == 37
    assert out.scales[0] == pytest.approx(0.75)


def test_from_cfg_uses_train_and_test_sizes():
    cfg = get_cfg()
    cfg.merge_from_list(["TRAIN.SCALES", "(64, 72)", "TRAIN.MAX_SIZE", "120", "TEST.SCALE", "48",
                         "TEST.MAX_SIZE", "100"])
    assert_and_infer_cfg(cfg)
    p = Preprocessor.from_cfg(cfg)
    p.eval()
    assert p([torch.rand(3, 40, 40)])[0].image_sizes == [(48, 48)]
    p.train()
    got = {p([torch.rand(3, 40, 40)])[0].image_sizes[0][0] for _ in range(30)}
    assert got == {64, 72}


def test_bad_inputs_are_explained():
    p = Preprocessor((32,), 64, MEAN, STD)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        p([torch.rand(1, 32, 32)])
    with pytest.raises(TypeError, match="float"):
        p([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="targets"):
        p([torch.rand(3, 8, 8)], [])
    with pytest.raises(ValueError, match="pixel_order"):
        Preprocessor((32,), 64, MEAN, STD, pixel_order="GBR")


def test_explicit_size_applies_to_one_call_in_either_mode():
    p = Preprocessor((64, 72), 120, MEAN, STD, test_min_size=48, test_max_size=100)
    image = torch.rand(3, 40, 60)
    for mode in (p.eval, p.train):
        mode()
        out, _ = p([image], min_size=80, max_size=100)
        assert out.image_sizes == [(66, 100)] and out.scales[0] == pytest.approx(100 / 60)
    p.eval()
    assert p([image])[0].image_sizes == [(48, 72)]  # nothing was stored
    assert (p.test_min_size, p.test_max_size) == (48, 100)
    with pytest.raises(ValueError, match="both min_size and max_size"):
        p([image], min_size=80)
