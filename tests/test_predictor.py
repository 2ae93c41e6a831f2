"""maskrcnn.Predictor: every input kind gives what the model gives on the equivalent tensor (with the same speed
features applied), lists run in batches, class names come from the checkpoint, bad input fails clearly."""
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn import Predictor
from maskrcnn.config import ConfigError, get_cfg
from maskrcnn.data.transforms import read_image_rgb, to_float_tensor
from maskrcnn.engine.speed import prepare_for_inference
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.predictor import default_class_names, load_config
from maskrcnn.utils.checkpoint import CheckpointError, load_ckpt, save_checkpoint
from maskrcnn.utils.vis import COCO_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
# Every RoI is kept (score 0) so that a random model returns a full set of detections to compare.
TINY = ["TEST.SCORE_THRESH", 0.0, "MODEL.DEVICE", "cpu"]
CLASSES = ["__background__", "rectangle", "ellipse", "triangle"]
PHOTOS = ["FudanPed00001.png", "PennPed00002.png", "FudanPed00003.png"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, checkpoint path): a seeded random model saved as train_net saves it, with its classes."""
    cfg = load_config(SMOKE, TINY)
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg)
    path = str(tmp_path_factory.mktemp("ckpt") / "model_final.pth")
    save_checkpoint(path, {"model": model.state_dict(), "iteration": 2, "cfg": cfg.dump(), "classes": CLASSES})
    return cfg, path


@pytest.fixture
def photos(shared_data):
    paths = [os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", p) for p in PHOTOS]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        pytest.fail(f"shared test photos not found: {missing}")
    return paths


def reference(cfg, ckpt, images, **prepare):
    """The hand-built path a researcher takes: build, load, prepare_for_inference, model(list of RGB tensors)."""
    model = Generalized_RCNN(cfg)
    load_ckpt(model, ckpt)
    prepare_for_inference(model, cfg, **prepare)
    with torch.inference_mode():
        return model(images)


def assert_same(got, want, class_names=CLASSES):
    assert set(got) == {"boxes", "labels", "scores", "masks", "class_names"}
    assert len(got["boxes"]) > 0
    for k in ("boxes", "labels", "scores", "masks"):
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    assert got["class_names"] == [class_names[k] for k in want["labels"].tolist()]


def test_every_input_kind_matches_the_model_on_the_equivalent_tensor(tiny, photos):
    cfg, ckpt = tiny
    predictor = Predictor(SMOKE, ckpt, overrides=TINY)
    path = photos[0]
    rgb = read_image_rgb(path)
    want = reference(cfg, ckpt, [to_float_tensor(rgb)])[0]
    assert want["masks"].shape[-2:] == rgb.shape[:2]  # boxes and masks in the input image's pixels
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    chw_uint8 = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    inputs = {"path": (path, "BGR"), "pathlike": (type("P", (), {"__fspath__": lambda s: path})(), "BGR"),
              "bgr array": (bgr, "BGR"), "rgb array": (rgb, "RGB"), "float rgb array": (rgb / 255.0, "RGB"),
              "uint8 tensor": (chw_uint8, "BGR"), "float tensor": (to_float_tensor(rgb), "BGR"),
              "pil": (Image.fromarray(rgb), "BGR")}
    for name, (image, fmt) in inputs.items():
        got = predictor(image, format=fmt)
        assert isinstance(got, dict), name
        if name == "float rgb array":  # float64 /255 then float32: the same pixels up to one rounding
            for k in ("boxes", "scores"):
                torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-3)
            continue
        assert_same(got, want)


def test_bgr_and_rgb_arrays_differ_when_the_format_is_wrong(tiny, photos):
    cfg, ckpt = tiny
    predictor = Predictor(SMOKE, ckpt, overrides=TINY)
    rgb = read_image_rgb(photos[1])
    right, wrong = predictor(rgb, format="RGB"), predictor(rgb)  # the default is BGR, as cv2.imread returns
    assert not torch.equal(right["scores"], wrong["scores"])
    assert torch.equal(predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["scores"], right["scores"])


def test_a_list_runs_in_batches_of_ims_per_batch_or_batch_size(tiny, photos):
    cfg, ckpt = tiny
    images = [read_image_rgb(p) for p in photos]
    tensors = [to_float_tensor(im) for im in images]
    for kwargs, sizes in (({"batch_size": 2}, [2, 1]), ({"overrides": TINY + ["TEST.IMS_PER_BATCH", 3]}, [3]),
                          ({}, [1, 1, 1])):
        predictor = Predictor(SMOKE, ckpt, **{"overrides": TINY, **kwargs})
        calls = []
        handle = predictor.model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
        got = predictor(images, format="RGB")
        handle.remove()
        assert calls == sizes, kwargs
        assert isinstance(got, list) and len(got) == 3
        want, start = [], 0
        for n in sizes:
            want += reference(cfg, ckpt, tensors[start:start + n])
            start += n
        for g, w in zip(got, want):
            assert_same(g, w)
    # a tuple and a (B, 3, H, W) tensor are lists too
    predictor = Predictor(SMOKE, ckpt, overrides=TINY, batch_size=2)
    same = [torch.nn.functional.interpolate(t[None], size=(48, 64), mode="bilinear")[0] for t in tensors[:2]]
    stacked = predictor(torch.stack(same))
    assert isinstance(stacked, list) and len(stacked) == 2
    for g, w in zip(stacked, reference(cfg, ckpt, same)):
        assert_same(g, w)
    assert len(predictor(tuple(images), format="RGB")) == 3
    assert predictor([]) == []


def test_class_names_from_checkpoint_argument_or_defaults(tiny, photos):
    cfg, ckpt = tiny
    assert Predictor(SMOKE, ckpt, overrides=TINY).class_names == CLASSES
    names = ["bg", "a", "b", "c"]
    p = Predictor(SMOKE, ckpt, overrides=TINY, class_names=names)
    assert p.class_names == names
    out = p(photos[0])
    assert out["class_names"] == [names[k] for k in out["labels"].tolist()]
    with pytest.raises(ConfigError, match=r"3 class names .* model has 4 classes \(MODEL.NUM_CLASSES"):
        Predictor(SMOKE, ckpt, overrides=TINY, class_names=["bg", "a", "b"])
    bare = os.path.join(os.path.dirname(ckpt), "bare_state_dict.pth")
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    assert Predictor(SMOKE, bare, overrides=TINY).class_names == ["__background__", "class 1", "class 2", "class 3"]
    assert default_class_names(81) == COCO_CLASSES
    coco91 = default_class_names(91)  # torchvision: labels are COCO category ids
    assert (coco91[1], coco91[12], coco91[13], coco91[90], coco91.count("N/A")) == \
        ("person", "N/A", "stop sign", "toothbrush", 10)


def test_config_from_the_checkpoint_and_overrides(tiny, photos):
    cfg, ckpt = tiny
    want = Predictor(SMOKE, ckpt, overrides=TINY)(photos[0])
    assert_same(Predictor(None, ckpt)(photos[0]), want)  # the checkpoint holds cfg (with TINY merged)
    assert_same(Predictor(cfg, ckpt)(photos[0]), want)  # a CfgNode
    high = Predictor(None, ckpt, score_thresh=0.3)
    assert high.cfg.TEST.SCORE_THRESH == 0.3
    assert bool((high(photos[0])["scores"] >= 0.3).all())
    bare = os.path.join(os.path.dirname(ckpt), "bare_state_dict.pth")
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    with pytest.raises(ConfigError, match=r"no config given .*bare_state_dict.pth"):
        Predictor(None, bare)
    with pytest.raises(ConfigError, match="TEST.NO_SUCH_KEY"):
        Predictor(SMOKE, ckpt, overrides=["TEST.NO_SUCH_KEY", 1])


def test_weights_are_required_unless_random_weights_is_asked_for(tiny, tmp_path):
    cfg, ckpt = tiny
    with pytest.raises(ValueError, match="random_weights=True"):
        Predictor(SMOKE)
    p = Predictor(SMOKE, random_weights=True, overrides=TINY)
    assert p.class_names == ["__background__", "class 1", "class 2", "class 3"]
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        Predictor(SMOKE, str(tmp_path / "nope.pth"))
    other = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        Predictor(other, ckpt)  # FPN.DIM 64 vs the checkpoint's 32


def test_bad_inputs_name_the_value(tiny, tmp_path):
    cfg, ckpt = tiny
    p = Predictor(SMOKE, ckpt, overrides=TINY)
    ok = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="no_such.jpg"):
        p(str(tmp_path / "no_such.jpg"))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match="empty.png"):
        p([ok, str(empty)])
    cases = [
        (np.zeros((3, 40, 50), np.uint8), ValueError, r"image: a NumPy image must be \(H, W, 3\).*\(3, 40, 50\)"),
        (np.zeros((40, 50, 3), np.int32), ValueError, "unsupported array dtype int32"),
        (np.full((40, 50, 3), 255.0), ValueError, r"float image must hold values in \[0, 1\], got \[255, 255\]"),
        (torch.zeros(40, 50, 3), ValueError, r"\(3, H, W\) RGB, got shape \(40, 50, 3\).*permute"),
        (torch.zeros(3, 40, 50, dtype=torch.int64), ValueError, "unsupported tensor dtype torch.int64"),
        (torch.full((3, 40, 50), 255.0), ValueError, r"\[0, 1\], got \[255, 255\]; pass 0..255 images as uint8"),
        (np.full((40, 50, 3), np.nan, np.float32), ValueError, r"\[0, 1\], got \[nan, nan\]"),
        (np.zeros((0, 50, 3), np.uint8), ValueError, "empty image"),
        (object(), TypeError, "got object"),
    ]
    for bad, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            p(bad)
    with pytest.raises(ValueError, match=r"images\[1\]: a NumPy image"):
        p([ok, np.zeros((3, 40, 50), np.uint8)])
    with pytest.raises(ValueError, match=r"format='BRG' is not known"):
        p(ok, format="BRG")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        Predictor(SMOKE, ckpt, overrides=TINY, batch_size=0)
    # gray, gray (H, W, 1), alpha and 16-bit arrays are accepted as the file reader accepts them
    gray = (np.arange(40 * 50) % 256).astype(np.uint8).reshape(40, 50)
    want = p(np.repeat(gray[:, :, None], 3, axis=2))
    for variant in (gray, gray[:, :, None], np.dstack([np.repeat(gray[:, :, None], 3, axis=2), ok[:, :, :1]]),
                    gray.astype(np.uint16) << 8):
        assert torch.equal(p(variant)["scores"], want["scores"])


def test_from_model_prepares_an_in_process_model(tiny, photos):
    cfg, ckpt = tiny
    model = Generalized_RCNN(cfg)
    load_ckpt(model, ckpt)
    model.train()
    p = Predictor.from_model(model, class_names=CLASSES)
    assert p.model is model and not model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded (TEST.FUSE_FROZEN_BN)
    rgb = read_image_rgb(photos[2])
    assert_same(p(rgb, format="RGB"), reference(cfg, ckpt, [to_float_tensor(rgb)])[0])
    unprepared = Generalized_RCNN(cfg)
    q = Predictor.from_model(unprepared, cfg, prepare=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unprepared.modules())
    assert q.class_names == default_class_names(4)
    # Fine-tuning surgery: new predictors for 2 classes in a model whose cfg says 4.
    from maskrcnn.modeling.roi_heads.box_outputs import FastRCNNOutputs
    unprepared.Box_Outs = FastRCNNOutputs(unprepared.Box_Head.out_channels, 2)
    assert Predictor.from_model(unprepared, prepare=False, class_names=["bg", "person"]).class_names == ["bg", "person"]
    with pytest.raises(ValueError, match="model has 2 classes"):
        Predictor.from_model(unprepared, prepare=False, class_names=CLASSES)
    with pytest.raises(ValueError, match="has no .cfg"):
        Predictor.from_model(torch.nn.Conv2d(3, 3, 1))


def test_test_amp_runs_the_body_in_bf16_and_returns_fp32(tiny, photos):
    cfg, ckpt = tiny
    p = Predictor(SMOKE, ckpt, overrides=TINY + ["TEST.AMP", "bf16"])
    dtypes = []
    handle = p.model.Conv_Body.register_forward_hook(lambda m, a, out: dtypes.append(
        (out[0] if isinstance(out, (list, tuple)) else out).dtype))
    out = p(photos[0])
    handle.remove()
    assert dtypes == [torch.bfloat16]
    assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32
    fp32 = Predictor(SMOKE, ckpt, overrides=TINY)(photos[0])
    assert len(out["boxes"]) > 0 and out["masks"].shape[-2:] == fp32["masks"].shape[-2:]


@pytest.mark.parametrize("overrides, n", [(["MODEL.MASK_ON", False], 20),
                                          (["MODEL.RPN_ONLY", True, "MODEL.MASK_ON", False], 50)])
def test_models_without_masks_return_no_masks_key(overrides, n):
    p = Predictor(SMOKE, random_weights=True, overrides=TINY + overrides)
    out = p(np.full((60, 80, 3), 128, np.uint8))
    assert set(out) == {"boxes", "labels", "scores", "class_names"} and len(out["boxes"]) == n


def test_no_cuda_device_is_a_clear_error_on_a_cpu_machine(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error is for machines without it")
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        Predictor(SMOKE, tiny[1], device="cuda")


@pytest.mark.slow
def test_a_train_net_checkpoint_carries_its_config_and_class_names(tmp_path, photos):
    import subprocess
    import sys

    out = tmp_path / "train"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--cfg", SMOKE, "--output_dir",
                        str(out), "--nw", "0", "--no_cuda"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("model_0000001.pth", "model_final.pth"):
        assert torch.load(out / name, weights_only=True)["classes"] == CLASSES, name
    p = Predictor(None, str(out / "model_final.pth"), device="cpu", score_thresh=0.0)
    assert p.class_names == CLASSES and p.cfg.TEST.SCALE == 64
    det = p(photos[0])
    assert det["class_names"] == [CLASSES[k] for k in det["labels"].tolist()]


def test_import_maskrcnn_is_light_and_predictor_loads_on_first_use():
    import subprocess
    import sys

    code = ("import sys, maskrcnn; light = 'torch' not in sys.modules; from maskrcnn import Predictor; "
            "print(light, Predictor.__module__, maskrcnn.__all__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=300)
    expected = "True maskrcnn.predictor ['__version__', 'get_cfg', 'Generalized_RCNN', 'build_model', 'load_ckpt', 'Predictor']"
    assert r.stdout.strip() == expected, r.stdout + r.stderr


def test_pil_images_of_16_bit_and_float_modes_read_like_arrays(tmp_path):
    # PIL's convert("RGB") clips I;16 / I / F images to 0..255: a 16-bit photo came out white, a float one black.
    from maskrcnn.predictor import image_to_rgb_tensor

    a = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    expected = image_to_rgb_tensor(a)
    assert 0.4 < float(expected.mean()) < 0.6
    Image.fromarray(a).save(tmp_path / "x16.png")
    for im in (Image.fromarray(a), Image.open(tmp_path / "x16.png"), Image.fromarray(a.astype(np.int32))):
        assert im.mode in ("I;16", "I")
        assert torch.equal(image_to_rgb_tensor(im), expected)
    assert torch.equal(image_to_rgb_tensor(tmp_path / "x16.png"), expected)  # the file path reads the same
    f = image_to_rgb_tensor(Image.fromarray(np.full((10, 12), 0.5, np.float32)))
    assert f.shape == (3, 10, 12) and torch.all(f == 0.5)
    with pytest.raises(ValueError, match="mode 'I' must hold 0..65535"):
        image_to_rgb_tensor(Image.fromarray(np.full((4, 4), 70000, np.int32)))
