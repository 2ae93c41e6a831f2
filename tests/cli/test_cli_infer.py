"""maskrcnn.cli.infer (tools/infer_simple.py): pictures for every readable image, clear exit statuses otherwise."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from maskrcnn.cli.infer import main
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.predictor import load_config
from maskrcnn.utils.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
CLASSES = ["__background__", "rectangle", "ellipse", "triangle"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config(SMOKE, ["TEST.SCORE_THRESH", 0.0])
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "model_final.pth")
    save_checkpoint(path, {"model": Generalized_RCNN(cfg).state_dict(), "cfg": cfg.dump(), "classes": CLASSES})
    return path


def photo(shared_data, name):
    return os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", name)


def test_draws_every_readable_image_in_batches_and_skips_unreadable_ones(ckpt, shared_data, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    images = [photo(shared_data, "FudanPed00001.png"), str(bad), photo(shared_data, "PennPed00002.png"),
              photo(shared_data, "FudanPed00003.png")]
    out = tmp_path / "vis"
    rc = main(["--cfg", SMOKE, "--load_ckpt", ckpt, "--images"] + images + ["--output_dir", str(out), "--thresh",
              "0", "--no_cuda", "--set", "TEST.SCORE_THRESH", "0", "TEST.IMS_PER_BATCH", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"skipping {bad}" in captured.err and "truncated PNG" in captured.err
    assert sorted(os.listdir(out)) == ["FudanPed00001.png", "FudanPed00003.png", "PennPed00002.png"]
    for path in images[:1] + images[2:]:
        drawn = cv2.imread(str(out / os.path.basename(path)))
        original = cv2.imread(path)
        assert drawn.shape == original.shape
        assert not np.array_equal(drawn, original)  # detections drawn (every score >= 0)
        assert f"{path}: 20 detections, 20 drawn (score >= 0.0) -> {out / os.path.basename(path)}" in captured.out


def test_image_dir_and_config_from_the_checkpoint(ckpt, tmp_path, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("b.jpg", "a.PNG"):
        cv2.imwrite(str(folder / name), rng.randint(0, 255, (50, 70, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    rc = main(["--load_ckpt", ckpt, "--image_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--thresh",
               "0.0", "--no_cuda"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    lines = [ln for ln in captured.out.splitlines() if " detections, " in ln]
    assert [ln.split(":")[0] for ln in lines] == [str(folder / "a.PNG"), str(folder / "b.jpg")]


@pytest.mark.parametrize("extra, rc, needle", [
    (["--images", "no/such.jpg"], 2, "image files not found: no/such.jpg"),
    (["--image_dir", "no/such/dir"], 2, "--image_dir no/such/dir: not a folder"),
    (["--set", "TEST.NO_SUCH_KEY", "1"], 2, "unknown config key 'TEST.NO_SUCH_KEY'"),
    (["--cfg", "no/such.yaml"], 2, "error: config file not found"),
])
def test_bad_command_lines_exit_2(ckpt, shared_data, tmp_path, capsys, extra, rc, needle):
    argv = ["--cfg", SMOKE, "--load_ckpt", ckpt, "--output_dir", str(tmp_path), "--no_cuda"]
    if "--images" not in extra and "--image_dir" not in extra:
        argv += ["--images", photo(shared_data, "FudanPed00001.png")]
    assert main(argv + extra) == rc
    assert needle in capsys.readouterr().err


def test_weights_errors(ckpt, shared_data, tmp_path, capsys):
    image = photo(shared_data, "FudanPed00001.png")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"garbage" * 10)
    assert main(["--cfg", SMOKE, "--load_ckpt", str(corrupt), "--images", image, "--output_dir", str(tmp_path),
                 "--no_cuda"]) == 1
    assert f"error: checkpoint {corrupt} is truncated or corrupt" in capsys.readouterr().err
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    assert main(["--load_ckpt", str(bare), "--images", image, "--output_dir", str(tmp_path), "--no_cuda"]) == 2
    assert "hold no saved config; pass cfg=" in capsys.readouterr().err


@pytest.mark.slow
def test_tools_infer_simple_shim_runs_as_a_script(ckpt, shared_data, tmp_path):
    image = photo(shared_data, "PennPed00002.png")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "infer_simple.py"), "--cfg", SMOKE, "--load_ckpt",
                        ckpt, "--images", image, "--output_dir", str(tmp_path), "--no_cuda"], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{image}: 20 detections" in r.stdout
    assert os.listdir(tmp_path).count("PennPed00002.png") == 1


def test_output_names_never_overwrite_a_picture_or_an_input(tmp_path):
    from maskrcnn.cli.infer import output_paths

    a, b = tmp_path / "a", tmp_path / "b"
    images = [str(a / "pic.jpg"), str(a / "pic.png"), str(b / "pic.jpg"), str(a / "other.jpg")]
    out = output_paths(images, str(tmp_path / "vis"))
    assert [os.path.basename(out[p]) for p in images] == ["pic.png", "pic_png.png", "pic_jpg.png", "other.png"]
    # --output_dir the image folder: a .png image is not overwritten by its own picture.
    same = output_paths([str(a / "photo.png"), str(a / "photo.jpg")], str(a))
    assert same == {str(a / "photo.png"): str(a / "photo_png.png"), str(a / "photo.jpg"): str(a / "photo_jpg.png")}


def test_drawing_into_the_image_folder_keeps_the_images(ckpt, tmp_path, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(folder / "photo.png"), rgb)
    cv2.imwrite(str(folder / "photo.jpg"), rgb)
    before = (folder / "photo.png").read_bytes()
    rc = main(["--load_ckpt", ckpt, "--image_dir", str(folder), "--output_dir", str(folder), "--no_cuda"])
    assert rc == 0, capsys.readouterr().err
    assert (folder / "photo.png").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["photo.jpg", "photo.png", "photo_jpg.png", "photo_png.png"]
