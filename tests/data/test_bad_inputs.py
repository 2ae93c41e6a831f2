"""Fault injection for the data side: odd or broken image files, bad COCO annotations, crashing loader workers.

Every broken file is generated in ``tmp_path``. Each test checks what the user sees: the error type and that the
message names the file / image id / annotation id, or the exact pixels and targets for the odd-but-valid inputs.
"""
import json
import os
import signal
import tracemalloc
import warnings

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from maskrcnn.data import transforms as T
from maskrcnn.data.build import DatasetItemError, WorkerDiedError, build_test_loader, build_train_loader
from maskrcnn.data.datasets.coco import COCODataset
from maskrcnn.data.datasets.pennfudan import PennFudanDataset
from maskrcnn.data.validate import UnreadableImagesError, validate_dataset

H, W = 24, 32


def _rand_rgb(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _make_coco(tmp_path, anns, images=None, cats=None, files=None):
    """A COCO json + image folder; ``files`` maps file name -> BGR array or bytes (default: a random PNG each)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
    files = files if files is not None else {im["file_name"]: _rand_rgb(im["height"], im["width"], im["id"])
                                             for im in images}
    for name, content in files.items():
        if isinstance(content, bytes):
            (img_dir / name).write_bytes(content)
        else:
            cv2.imwrite(str(img_dir / name), content)
    data = {"images": images, "annotations": anns,
            "categories": cats or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]}
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(ann_file), str(img_dir)


def _ann(i, bbox, image_id=1, cat=1, segm=None):
    x, y, w, h = bbox
    if segm is None:
        segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": 0,
            "segmentation": segm}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# images
def test_missing_image_names_file_and_image_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg \(image id 7\)"):
        T.read_image_rgb(str(tmp_path / "nope.jpg"), image_id=7)
    ann, img_dir = _make_coco(tmp_path, [_ann(1, [1, 1, 5, 5])], files={})
    ds = COCODataset(ann, img_dir)
    with pytest.raises(FileNotFoundError, match=r"'a.png' of image id 1"):
        ds[0]


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_file_is_an_error_not_a_grey_image(tmp_path, ext):
    path = str(tmp_path / f"t.{ext}")
    cv2.imwrite(path, _rand_rgb(64, 64))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    # OpenCV alone returns a half-grey image for the JPEG: the check must catch it before decoding.
    with pytest.raises(OSError, match=rf"truncated {'JPEG' if ext == 'jpg' else 'PNG'} file.*t\.{ext} \(image id 3\)"):
        T.read_image_rgb(path, image_id=3)


def test_not_an_image_and_empty_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(OSError, match=r"notes\.jpg"):
        T.read_image_rgb(str(text))
    with pytest.raises(OSError, match=r"not a readable image file.*notes\.jpg"):
        T.image_file_size(str(text))
    # the bounded-size path (whose header reader fails first) ends in the same decoder message
    with pytest.raises(OSError, match=r"could not decode image file .*notes\.jpg \(image id 3\)"):
        T.read_image_rgb(str(text), max_side=4096, image_id=3)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match=r"empty \(0 bytes\).*empty\.png \(image id 5\)"):
        T.read_image_rgb(str(empty), image_id=5)


def test_grayscale_rgba_and_16_bit_become_8_bit_rgb(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgb = T.read_image_rgb(str(tmp_path / "g.png"))
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)

    bgra = np.zeros((H, W, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 0   # fully transparent: alpha dropped
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    rgb = T.read_image_rgb(str(tmp_path / "rgba.png"))
    assert rgb.shape == (H, W, 3) and rgb[0, 0].tolist() == [30, 20, 10]

    deep = np.zeros((H, W), np.uint16)
    deep[0, :4] = [0, 257, 40000, 65535]
    cv2.imwrite(str(tmp_path / "d16.png"), deep)
    rgb = T.read_image_rgb(str(tmp_path / "d16.png"))
    assert rgb.dtype == np.uint8 and rgb[0, :4, 0].tolist() == [0, 1, 156, 255]   # v >> 8: full range kept


def test_exif_orientation_is_applied_and_reported_in_the_header_size(tmp_path):
    raw = np.zeros((20, 40, 3), np.uint8)
    raw[:5, :10] = (255, 0, 0)                       # red block top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display"
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(raw).save(path, exif=exif, quality=100)
    rgb = T.read_image_rgb(path)
    assert rgb.shape == (40, 20, 3)
    assert T.image_file_size(path) == (40, 20)
    # after a 90 degree clockwise turn the block is at the top-right
    assert rgb[:10, -5:, 0].mean() > 200 and rgb[-10:, :5, 0].mean() < 50
    # the reduced-resolution path applies it too
    small = T.read_image_rgb(path, max_side=20)
    assert small.shape == (20, 10, 3)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("huge") / "huge.jpg")
    big = np.zeros((9000, 12000, 3), np.uint8)
    big[::100] = 255
    cv2.imwrite(path, big)
    return path


def test_very_large_image_is_read_reduced_with_bounded_memory(huge_jpeg):
    tracemalloc.start()
    try:
        rgb = T.read_image_rgb(huge_jpeg, max_side=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.shape == (750, 1000, 3)
    # a full decode would hold 12000 * 9000 * 3 = 324 MB; the 1/8 decode holds 1500 * 1125 * 3 = 5 MB
    assert peak < 30e6, peak
    assert T.image_file_size(huge_jpeg) == (9000, 12000)


def test_large_image_in_a_coco_dataset_scales_boxes_and_masks(tmp_path):
    big_h, big_w = 600, 800
    anns = [_ann(1, [100, 200, 400, 200]),
            {**_ann(2, [0, 0, 80, 60]), "segmentation": _rle(np.pad(np.ones((60, 80), np.uint8),
                                                                     ((0, big_h - 60), (0, big_w - 80))))}]
    images = [{"id": 1, "file_name": "big.png", "height": big_h, "width": big_w}]
    ann, img_dir = _make_coco(tmp_path, anns, images=images)
    full = COCODataset(ann, img_dir)
    ds = COCODataset(ann, img_dir, max_image_side=200)
    image, t = ds[0]
    assert image.shape == (3, 150, 200)
    _, t_full = full[0]
    torch.testing.assert_close(t["boxes"], t_full["boxes"] / 4)
    assert t["boxes"][0].tolist() == [25.0, 50.0, 125.0, 100.0]
    assert t["masks"].shape == (2, 150, 200)
    assert int(t["masks"][0].sum()) == 100 * 50 and int(t["masks"][1].sum()) == 20 * 15
    torch.testing.assert_close(t["area"], t_full["area"] / 16)


def _rle(mask, size=None):
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    if size is not None:
        rle["size"] = size
    return rle


# ----------------------------------------------------------------------------------------------------------------------
# annotations
def test_truncated_or_non_json_annotation_file_names_file_and_position(tmp_path):
    ann, img_dir = _make_coco(tmp_path, [_ann(1, [1, 1, 5, 5])])
    text = open(ann).read()
    open(ann, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"ann\.json is not valid json .*line 1 column \d+ \(char \d+\)"):
        COCODataset(ann, img_dir)
    open(ann, "w").write("[1, 2]")
    with pytest.raises(ValueError, match=r"ann\.json must hold a json object"):
        COCODataset(ann, img_dir)
    open(ann, "w").write(json.dumps({"images": [{"id": 1}], "categories": []}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks \['file_name', 'height', 'width'\]"):
        COCODataset(ann, img_dir)


def _problems(tmp_path, anns, **kw):
    ann, img_dir = _make_coco(tmp_path, anns, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = COCODataset(ann, img_dir)
    return ds, {p.ann_id: p.kind for p in ds.annotation_problems}, [str(w.message) for w in caught]


def test_annotation_of_a_missing_image_and_undeclared_category(tmp_path):
    ds, kinds, msgs = _problems(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5], image_id=99),
                                           _ann(3, [1, 1, 5, 5], cat=42)])
    assert kinds == {2: "missing_image", 3: "undeclared_category"}
    assert len(msgs) == 1 and "image id 99 is not in 'images'" in msgs[0] and "category_id 42" in msgs[0]
    assert ds.get_target(0)["labels"].tolist() == [1]


@pytest.mark.parametrize("bbox, kind", [([1, 1, float("nan"), 3], "nonfinite_box"),
                                        ([1, float("inf"), 3, 3], "nonfinite_box"),
                                        ([5, 5, 0, 4], "degenerate_box"), ([5, 5, 4, -2], "degenerate_box"),
                                        ([W + 5, 2, 4, 4], "box_outside_image")])
def test_bad_boxes_are_dropped_and_named(tmp_path, bbox, kind):
    ds, kinds, msgs = _problems(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(7, bbox, segm=[[1, 1, 4, 1, 4, 4]])])
    assert kinds == {7: kind}
    assert len(msgs) == 1 and "annotation id 7 (image id 1)" in msgs[0] and "a.png" in msgs[0]
    assert len(ds.get_target(0)["boxes"]) == 1


def test_box_partly_outside_is_clipped_and_warned(tmp_path):
    ds, kinds, msgs = _problems(tmp_path, [_ann(4, [W - 4, H - 3, 10, 10])])
    assert kinds == {4: "box_clipped"} and "clipped" in msgs[0]
    assert ds.get_target(0)["boxes"].tolist() == [[W - 4, H - 3, W, H]]


def test_short_polygon_and_rle_of_the_wrong_size_are_dropped(tmp_path):
    good = np.zeros((H, W), np.uint8)
    good[2:6, 2:6] = 1
    ds, kinds, msgs = _problems(tmp_path, [_ann(1, [1, 1, 5, 5], segm=[[1, 1, 5, 1]]),
                                           _ann(2, [2, 2, 4, 4], segm=_rle(good, size=[H + 1, W])),
                                           _ann(3, [2, 2, 4, 4], segm=_rle(good))])
    assert kinds == {1: "short_polygon", 2: "rle_size_mismatch"}
    assert f"but the image is {H}x{W}" in msgs[0]
    np.testing.assert_array_equal(ds.get_target(0)["masks"][0].numpy(), good)


def test_image_without_objects_is_kept_as_a_negative(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W},
              {"id": 2, "file_name": "b.png", "height": H, "width": W}]
    ds, kinds, msgs = _problems(tmp_path, [_ann(1, [1, 1, 5, 5])], images=images)
    assert not kinds and not msgs and len(ds) == 2
    image, t = ds[1]
    assert image.shape == (3, H, W) and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, H, W)
    assert validate_dataset(ds).ok


def test_mask_file_of_the_wrong_shape_is_reported(tmp_path):
    root = tmp_path / "pf"
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for k, mask_shape in enumerate([(H, W), (H, W + 2)]):
        cv2.imwrite(str(root / "PNGImages" / f"p{k}.png"), _rand_rgb())
        m = np.zeros(mask_shape, np.uint8)
        m[2:8, 3:9] = 1
        Image.fromarray(m).save(root / "PedMasks" / f"p{k}_mask.png")
    ds = PennFudanDataset(str(root), split="all")
    report = validate_dataset(ds)
    assert report.unreadable == [1] and report.counts() == {"mask_shape_mismatch": 1}
    assert "p1_mask.png" in report.summary() and f"but the image is {H}x{W}" in report.summary()
    with pytest.raises(ValueError, match=r"p1_mask\.png"):
        ds[1]


def test_validation_reports_everything_at_once_then_fails_or_skips(tmp_path):
    names = ["ok.png", "gone.png", "trunc.png", "text.png", "big.png", "ok2.jpg"]
    images = [{"id": i + 1, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)]
    png = cv2.imencode(".png", _rand_rgb())[1].tobytes()
    files = {"ok.png": _rand_rgb(), "trunc.png": png[:-20], "text.png": b"hello", "big.png": _rand_rgb(H + 1, W),
             "ok2.jpg": _rand_rgb()}
    anns = [_ann(i + 1, [1, 1, 5, 5], image_id=i + 1) for i in range(len(names))] + [
        _ann(50, [1, 1, float("nan"), 2])]
    ann, img_dir = _make_coco(tmp_path, anns, images=images, files=files)
    ds = _quiet(COCODataset, ann, img_dir)
    report = validate_dataset(ds)
    assert report.unreadable == [1, 2, 3, 4]
    assert report.counts() == {"nonfinite_box": 1, "missing_file": 1, "unreadable_image": 2,
                               "image_size_mismatch": 1}
    text = report.summary()
    for needle in ("gone.png", "image id 2", "truncated PNG", "text.png", "big.png", f"{H + 1}x{W}",
                   "annotation id 50"):
        assert needle in text, (needle, text)

    with pytest.raises(UnreadableImagesError, match=r"(?s)4 image\(s\).*SKIP_UNREADABLE.*gone\.png.*trunc\.png"):
        build_train_loader(ds, 2, aspect_grouping=False)
    with pytest.warns(UserWarning, match="skipping unusable images"):
        it = build_train_loader(ds, 2, aspect_grouping=False, skip_unreadable=True, flip=False)
    seen = set()
    for _ in range(3):
        _, targets = next(it)
        seen |= {int(t["image_id"]) for t in targets}
    assert seen == {1, 6}


# ----------------------------------------------------------------------------------------------------------------------
# loader workers
def test_worker_exception_names_index_file_and_real_error(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
              {"id": 2, "file_name": "b.jpg", "height": H, "width": W}]
    jpg = cv2.imencode(".jpg", _rand_rgb())[1].tobytes()
    ann, img_dir = _make_coco(tmp_path, [], images=images, files={"a.jpg": jpg, "b.jpg": jpg})
    ds = COCODataset(ann, img_dir)
    # corrupt after the dataset was validated / built: the worker meets it mid-run
    with open(os.path.join(img_dir, "b.jpg"), "wb") as f:
        f.write(jpg[:200])
    loader = build_test_loader(ds, num_workers=1)
    with pytest.raises(DatasetItemError) as info:
        list(loader)
    msg = str(info.value)
    assert "dataset index 1" in msg and "'b.jpg'" in msg and "image id 2" in msg
    assert "truncated JPEG" in msg and "DataLoader worker process 0" in msg


class _KillOn(torch.utils.data.Dataset):
    classes = ["__background__", "x"]

    def __init__(self, victim):
        self.victim = victim

    def __len__(self):
        return 4

    def get_image_info(self, index):
        return {"file_name": f"img{index}.png", "height": 8, "width": 8, "id": 100 + index}

    def __getitem__(self, index):
        if index == self.victim and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, 8, 8), {"image_id": torch.tensor(100 + index)}


def test_killed_worker_is_reported_with_the_sample_it_was_loading():
    loader = build_test_loader(_KillOn(victim=2), num_workers=1)
    with pytest.raises(WorkerDiedError) as info:
        list(loader)
    msg = str(info.value)
    assert "worker process died" in msg and "dataset index 2" in msg and "'img2.png'" in msg
    assert "image id 102" in msg
