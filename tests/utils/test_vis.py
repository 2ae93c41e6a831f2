"""maskrcnn.utils.vis on its own: colours, Detectron's cls format, pixels drawn by draw_instances, vis_one_image."""
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from maskrcnn.utils.vis import (
    COCO_CLASSES, colormap, convert_from_cls_format, draw_instances, get_coco_dataset, vis_one_image,
)

H, W = 60, 80


def _black():
    return np.zeros((H, W, 3), np.uint8)


def _box_mask(x1, y1, x2, y2):
    m = np.zeros((H, W), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


# --- colours and class names --------------------------------------------------------------------------------------
def test_colormap_is_deterministic_distinct_and_saturated():
    c = colormap(80)
    assert c.shape == (80, 3) and c.dtype == np.uint8
    assert np.array_equal(c, colormap(80))
    assert len({tuple(x) for x in c}) == 80
    assert (c.max(axis=1) == 255).all() and (c.min(axis=1) < 100).all()  # bright, far from grey


def test_coco_dataset_names():
    ds = get_coco_dataset()
    assert len(COCO_CLASSES) == 81 and ds.classes[0] == "__background__"
    assert ds.classes[1] == "person" and ds.classes[80] == "toothbrush"


def test_convert_from_cls_format():
    cls_boxes = [[], np.array([[0, 0, 5, 5, 0.9]], np.float32), np.zeros((0, 5), np.float32),
                 np.array([[1, 1, 4, 4, 0.8], [2, 2, 6, 6, 0.7]], np.float32)]
    cls_segms = [[], ["s1"], [], ["s3a", "s3b"]]
    boxes, segms, keyps, classes = convert_from_cls_format(cls_boxes, cls_segms)
    assert boxes.shape == (3, 5) and np.allclose(boxes[:, 4], [0.9, 0.8, 0.7])
    assert segms == ["s1", "s3a", "s3b"] and keyps is None and classes == [1, 3, 3]
    boxes, segms, _, classes = convert_from_cls_format([[], []])
    assert boxes.shape == (0, 5) and segms is None and classes == []


# --- draw_instances -----------------------------------------------------------------------------------------------
def test_box_edges_take_the_instance_colour_and_the_rest_is_untouched():
    img = _black()
    out = draw_instances(img, np.array([[10, 12, 50, 40]]), [0.9], [1], show_class=False, box_alpha=1.0)
    color = colormap(1)[0]
    assert np.array_equal(out[12, 30], color) and np.array_equal(out[40, 30], color)  # top and bottom edges
    assert np.array_equal(out[25, 10], color) and np.array_equal(out[25, 50], color)  # left and right edges
    assert not out[20:33, 18:43].any()  # inside the box: no fill without a mask
    assert not out[:, :8].any() and not out[:, 53:].any()  # away from the box
    assert not img.any()  # the input is not modified


def test_box_alpha_blends_the_edge_with_the_image():
    img = np.full((H, W, 3), 100, np.uint8)
    out = draw_instances(img, np.array([[10, 12, 50, 40]]), [0.9], [1], show_class=False, box_alpha=0.5)
    expected = np.round(0.5 * colormap(1)[0].astype(float) + 0.5 * 100)
    assert np.abs(out[12, 30].astype(float) - expected).max() <= 1
    assert (out[25, 30] == 100).all()


def test_mask_pixels_are_tinted_with_the_instance_colour():
    img = np.full((H, W, 3), 40, np.uint8)
    mask = _box_mask(20, 15, 40, 35)
    out = draw_instances(img, np.array([[18, 13, 42, 37]]), [0.95], [1], masks=[mask], show_class=False,
                         box_alpha=0.0, mask_alpha=0.5)
    expected = (40 * 0.5 + colormap(1)[0] * 0.5).astype(np.uint8)
    assert (out[17:33, 22:38] == expected).all()  # the mask's inside
    assert (out[15, 25] == 255).all() and (out[25, 20] == 255).all()  # its outline is white
    assert (out[10, 25] == 40).all() and (out[25, 50] == 40).all()  # outside the mask: unchanged
    assert (out[~mask.astype(bool)] == 40).all()


def test_rle_masks_draw_like_binary_masks():
    mask = _box_mask(5, 5, 30, 25)
    rle = mask_util.encode(np.asfortranarray(mask))
    kwargs = dict(boxes=np.array([[5, 5, 30, 25]]), scores=[0.9], labels=[2], show_class=False)
    assert np.array_equal(draw_instances(_black(), masks=[mask], **kwargs),
                          draw_instances(_black(), masks=[rle], **kwargs))


def test_larger_instances_are_drawn_first_so_small_ones_stay_on_top():
    img = _black()
    big, small = _box_mask(0, 0, 60, 50), _box_mask(20, 20, 30, 30)
    out = draw_instances(img, np.array([[20, 20, 30, 30], [0, 0, 60, 50]]), [0.9, 0.9], [1, 2],
                         masks=[small, big], show_class=False, box_alpha=0.0, mask_alpha=1.0)
    colors = colormap(2)
    assert np.array_equal(out[40, 5], colors[0])  # the big one is first in drawing order: the first colour
    assert np.array_equal(out[25, 25], colors[1])  # the small one is painted over it


def test_low_scores_and_empty_detections_draw_nothing():
    img = np.random.RandomState(0).randint(0, 255, (H, W, 3)).astype(np.uint8)
    out = draw_instances(img, np.array([[10, 10, 40, 40]]), [0.3], [1], thresh=0.5)
    assert np.array_equal(out, img) and out is not img
    for boxes in (np.zeros((0, 4)), []):
        out = draw_instances(img, boxes, [], [], masks=[])
        assert np.array_equal(out, img)


def test_class_name_and_score_label_is_drawn_above_the_box():
    img = _black()
    out = draw_instances(img, np.array([[10, 30, 70, 55]]), [0.87], [1], class_names=get_coco_dataset(),
                         box_alpha=0.0)
    (tw, th), base = cv2.getTextSize("person 0.87", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    band = out[30 - th - base:30, 10:10 + tw]
    color = colormap(1)[0]
    assert (band == 255).all(axis=2).any()  # white text
    assert (band == color).all(axis=2).mean() > 0.5  # on a band of the instance colour
    assert not out[30 - th - base:30, 10 + tw + 1:].any()  # the label is as wide as its text
    wider = draw_instances(img, np.array([[10, 30, 70, 55]]), [0.87], [1], class_names=None, box_alpha=0.0)
    (tw2, _), _ = cv2.getTextSize("class 1 0.87", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    assert wider[30 - th - base:30, 10 + tw2 - 1].any() and not wider[30 - th - base:30, 10 + tw2 + 1:].any()


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) RGB image, got shape \(60, 80\)"):
        draw_instances(np.zeros((H, W), np.uint8), np.zeros((0, 4)), [], [])
    with pytest.raises(ValueError, match=r"mask 0 has shape \(10, 10\), image is \(60, 80\)"):
        draw_instances(_black(), np.array([[0, 0, 5, 5]]), [0.9], [1], masks=[np.ones((10, 10))])


# --- vis_one_image ------------------------------------------------------------------------------------------------
def test_vis_one_image_writes_the_drawing_as_bgr(tmp_path):
    im = np.full((H, W, 3), (200, 0, 0), np.uint8)  # RGB red
    boxes = np.array([[10, 10, 50, 40, 0.95], [0, 0, 5, 5, 0.2]], np.float32)
    path = vis_one_image(im, "/data/images/frame_07.jpg", str(tmp_path / "vis"), boxes, thresh=0.9)
    assert path == str(tmp_path / "vis" / "frame_07.png")
    written = cv2.imread(path)
    assert written.shape == (H, W, 3)
    assert tuple(written[30, 30]) == (0, 0, 200)  # inside the box: the image, in BGR on disk
    assert not np.array_equal(written[10, 30], written[30, 30])  # the box edge is drawn (box_alpha at least 0.3)
    assert tuple(written[2, 2]) == (0, 0, 200)  # the 0.2 box is below thresh


def test_vis_one_image_cls_format_with_masks_and_jpg(tmp_path):
    im = np.zeros((H, W, 3), np.uint8)
    mask = _box_mask(20, 20, 40, 40)
    rle = mask_util.encode(np.asfortranarray(mask))
    cls_boxes = [[], np.array([[18, 18, 42, 42, 0.99]], np.float32)]
    path = vis_one_image(im, "x.png", str(tmp_path), cls_boxes, segms=[[], [rle]], ext="jpg",
                         dataset=get_coco_dataset(), show_class=True)
    assert path.endswith("x.jpg")
    written = cv2.imread(path)
    assert written[28:32, 28:32].mean() > 40  # the mask is tinted
    assert written[50:, 50:].max() < 10  # far from the instance: still black (jpeg noise aside)


def test_vis_one_image_without_detections(tmp_path):
    im = np.zeros((H, W, 3), np.uint8)
    low = np.array([[0, 0, 10, 10, 0.5]], np.float32)
    assert vis_one_image(im, "a.jpg", str(tmp_path / "none"), low, thresh=0.9) is None
    assert vis_one_image(im, "a.jpg", str(tmp_path / "none"), np.zeros((0, 5)), thresh=0.9) is None
    assert not (tmp_path / "none").exists()
    path = vis_one_image(im, "a.jpg", str(tmp_path / "all"), np.zeros((0, 5)), out_when_no_box=True)
    assert np.array_equal(cv2.imread(path), im)


def test_vis_one_image_rejects_what_it_cannot_draw(tmp_path):
    im = np.zeros((H, W, 3), np.uint8)
    boxes = np.array([[0, 0, 10, 10, 0.95]], np.float32)
    with pytest.raises(ValueError, match="ext='pdf' is not supported; use 'png' or 'jpg'"):
        vis_one_image(im, "a", str(tmp_path), boxes, ext="pdf")
    with pytest.raises(ValueError, match="1 keypoint sets for 2 boxes|2 keypoint sets for 1 boxes"):
        vis_one_image(im, "a", str(tmp_path), boxes, keypoints=np.zeros((2, 17, 3)))
    assert vis_one_image(im, "a", str(tmp_path), boxes, keypoints=[None, []]) is not None  # Detectron's empty lists


def test_vis_one_image_draws_keypoints_and_skeleton(tmp_path):
    from maskrcnn.utils.vis import COCO_PERSON_SKELETON, draw_keypoints
    im = np.zeros((H, W, 3), np.uint8)
    kps = np.zeros((1, 17, 3), np.float32)
    kps[0, :, 0] = np.linspace(5, W - 5, 17)
    kps[0, :, 1] = H // 2
    kps[0, :, 2] = 5.0
    kps[0, 16, 2] = 0.0  # below kp_thresh: not drawn
    drawn = draw_keypoints(im, kps, kp_thresh=2.0)
    assert drawn[H // 2, int(kps[0, 0, 0])].any()  # a drawn point
    assert not drawn[H // 2, int(kps[0, 16, 0]) + 2].any()  # the invisible one (and no line to it: 14-16 not ok)
    assert (13, 15) in COCO_PERSON_SKELETON
    boxes = np.array([[0, 0, W - 1, H - 1, 0.95]], np.float32)
    path = vis_one_image(im, "kp", str(tmp_path), boxes, keypoints=kps, thresh=0.9)
    assert cv2.imread(path)[H // 2, int(kps[0, 0, 0])].any()
    # Detectron's cls_keypoints: per class a list of (4, K) arrays x, y, logit, prob
    cls_kps = [[], [np.concatenate([kps[0].T, np.ones((1, 17), np.float32)])]]
    path = vis_one_image(im, "kp2", str(tmp_path), [np.zeros((0, 5), np.float32), boxes], keypoints=cls_kps,
                         thresh=0.9)
    assert cv2.imread(path)[H // 2, int(kps[0, 0, 0])].any()
