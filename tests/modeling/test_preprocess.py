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


def _d2(**kw):
    return Preprocessor((32,), 1000, [103.53, 116.28, 123.675], [1.0, 1.0, 1.0], pixel_order="BGR",
                        pixel_scale=255.0, resize_method="detectron2", **kw).eval()


def test_detectron2_resize_sizes_and_pixels_are_pils():
    from PIL import Image
    import numpy as np
    # 50 x 79 to a short side of 32: scale 0.64, width 50.56 -> torchvision floors (50), detectron2 rounds (51).
    g = torch.Generator().manual_seed(0)
    rgb8 = torch.randint(0, 256, (3, 50, 79), generator=g, dtype=torch.uint8)
    image = rgb8.float() / 255.0
    tv = Preprocessor((32,), 1000, MEAN, STD).eval()
    assert tv([image])[0].image_sizes == [(32, 50)]
    out, _ = _d2()([image])
    assert out.image_sizes == [(32, 51)]
    assert Preprocessor.detectron2_output_shape(50, 79, 32, 1000) == (32, 51)
    assert Preprocessor.detectron2_output_shape(600, 1000, 800, 1333) == (800, 1333)  # 1333.33 by max size
    pil = np.array(Image.fromarray(rgb8.permute(1, 2, 0).numpy()).resize((51, 32), Image.BILINEAR))
    expected = torch.from_numpy(pil[:, :, ::-1].copy()).permute(2, 0, 1).float() - \
        torch.tensor([103.53, 116.28, 123.675])[:, None, None]
    assert torch.equal(out.tensors[0, :, :32, :51], expected)  # bit for bit: PIL on uint8, then normalised
    assert out.scales[0] == pytest.approx(0.64)


def test_size_divisibility_zero_pads_to_the_largest_image():
    images = [torch.rand(3, 32, 40), torch.rand(3, 32, 45)]
    out, _ = _d2(size_divisibility=0)(images)
    assert out.tensors.shape == (2, 3, 32, 45)
    assert _d2()(images)[0].tensors.shape == (2, 3, 32, 64)  # default: multiples of 32
    with pytest.raises(ValueError, match="size_divisibility"):
        _d2(size_divisibility=-1)


def test_detectron2_postprocess_clips_and_drops_empty_boxes():
    res = {"boxes": torch.tensor([[10.0, 5, 30, 20], [-4.0, 2, 50, 70], [70.0, 1, 90, 9]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 3]),
           "masks": torch.ones(3, 1, 4, 4)}
    # network input 40 x 80, original 20 x 30: x scaled by 30/80, y by 20/40
    out = _d2(detector_postprocess="detectron2", mask_paste_method="detectron2").postprocess(
        [res], [(40, 80)], [(20, 30)])[0]
    # box 2 ends beyond the right edge after scaling (x 26.25..33.75): clipped to [26.25, 30], kept;
    # box 1 is clipped to the image; none is empty here
    torch.testing.assert_close(out["boxes"], torch.tensor([[3.75, 2.5, 11.25, 10.0], [0.0, 1.0, 18.75, 20.0],
                                                           [26.25, 0.5, 30.0, 4.5]]))
    res["boxes"][2] = torch.tensor([85.0, 1, 90, 9])  # entirely right of the image: empty after clipping
    out = _d2(detector_postprocess="detectron2").postprocess([res], [(40, 80)], [(20, 30)])[0]
    assert out["boxes"].shape == (2, 4) and out["scores"].tolist() == pytest.approx([0.9, 0.8])
    assert out["labels"].tolist() == [1, 2] and out["masks"].shape == (2, 1, 20, 30)
    tv = _d2().postprocess([res], [(40, 80)], [(20, 30)])[0]  # torchvision's rule: scaled only
    assert tv["boxes"].shape == (3, 4) and tv["boxes"][1, 0] < 0


def test_mask_paste_method_selects_the_paste():
    from maskrcnn.ops.grid_paste import paste_masks_grid_sample
    from maskrcnn.ops.masks import paste_masks_in_image
    masks = torch.rand(2, 1, 28, 28)
    res = {"boxes": torch.tensor([[3.3, 4.6, 20.2, 30.9], [10.0, 1, 30, 18]]), "scores": torch.ones(2),
           "labels": torch.ones(2, dtype=torch.int64), "masks": masks}
    d2 = _d2(mask_paste_method="detectron2").postprocess([res], [(40, 40)], [(40, 40)])[0]["masks"]
    tv = _d2().postprocess([res], [(40, 40)], [(40, 40)])[0]["masks"]
    assert torch.equal(d2, paste_masks_grid_sample(masks, res["boxes"], (40, 40)))
    assert torch.equal(tv, paste_masks_in_image(masks, res["boxes"], (40, 40), padding=1))
    assert not torch.equal(d2, tv)
    with pytest.raises(ValueError, match="mask_paste_method"):
        _d2(mask_paste_method="pil")


def test_from_cfg_reads_the_detectron2_rules():
    cfg = get_cfg()
    cfg.merge_from_list(["RESIZE_METHOD", "detectron2", "SIZE_DIVISIBILITY", "0", "TEST.MASK_PASTE_METHOD",
                         "detectron2", "TEST.DETECTOR_POSTPROCESS", "detectron2"])
    assert_and_infer_cfg(cfg)
    p = Preprocessor.from_cfg(cfg)
    assert (p.resize_method, p.size_divisibility, p.mask_paste_method, p.detector_postprocess) == \
        ("detectron2", 0, "detectron2", "detectron2")
    p = Preprocessor.from_cfg(get_cfg())
    assert (p.resize_method, p.size_divisibility, p.mask_paste_method, p.detector_postprocess) == \
        ("torchvision", 32, "torchvision", "torchvision")
    cfg = get_cfg()
    cfg.merge_from_list(["RESIZE_METHOD", "pil"])
    with pytest.raises(Exception, match="RESIZE_METHOD"):
        assert_and_infer_cfg(cfg)


def test_a_side_that_would_resize_to_nothing_keeps_one_pixel():
    # 3x2000 at max 64 scales by 0.032: interpolate's floor(3 * 0.032) = 0 rows fails (torchvision too); one row is
    # kept, the other side as interpolate computes it, and the boxes follow.
    p = Preprocessor((64,), 64, MEAN, STD).train()
    image = torch.rand(3, 3, 2000)
    target = {"boxes": torch.tensor([[100.0, 0.0, 300.0, 3.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 3, 2000, dtype=torch.uint8)}
    out, t, scale = p.resize(image, target)
    assert tuple(out.shape) == (3, 1, 64) and scale == pytest.approx(0.032)
    assert tuple(t["masks"].shape) == (1, 1, 64)
    assert t["boxes"][0].tolist() == pytest.approx([3.2, 0.0, 9.6, 1.0], rel=1e-5)
    # Sizes that do not vanish resize exactly as before (torchvision's scale_factor path).
    ref = GeneralizedRCNNTransform(64, 64, MEAN, STD).resize(torch.rand(3, 40, 2000), None)[0]
    assert tuple(p.resize(torch.rand(3, 40, 2000))[0].shape) == tuple(ref.shape)
