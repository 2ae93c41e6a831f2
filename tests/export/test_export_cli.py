"""``maskrcnn-export`` / ``tools/export_model.py``: a checkpoint and config in, an exported file out, checked
against the eager model on a real photo."""
import os
import subprocess
import sys

import torch

from maskrcnn.cli.export import main

from export_models import PHOTOS, REPO, fpn_cfg

PHOTO_DIR = os.path.join(REPO, "..", "shared", "data", "PennFudanPed-sample", "PNGImages")


def _checkpoint_and_cfg(model, tmp_path):
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, ckpt)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(fpn_cfg().dump())
    return str(cfg), str(ckpt)


def test_torchscript_export_with_check(fpn_model, tmp_path, capsys):
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    out = tmp_path / "out" / "model.ts"
    photo = os.path.join(PHOTO_DIR, PHOTOS[1] + ".png")
    rc = main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "torchscript", "--output", str(out),
               "--example", os.path.join(PHOTO_DIR, PHOTOS[0] + ".png"), "--check", photo])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0, printed
    assert out.is_file()
    assert f"check {PHOTOS[1]}.png: detections" in printed and "outside tolerance" not in printed


def test_check_reports_an_image_the_exported_model_cannot_run(fpn_model, tmp_path, capsys, monkeypatch):
    # A .pt2 refuses shapes outside what its example traced ("Guard failed"): --check printed a traceback (exit 1).
    import maskrcnn.cli.export as export_cli

    def refusing_runner(fmt, path):
        def run(image):
            raise AssertionError("Guard failed: (31 + math.trunc(...)) // 32 != 1")
        return run

    monkeypatch.setattr(export_cli, "_runner", refusing_runner)
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    photo = os.path.join(PHOTO_DIR, PHOTOS[1] + ".png")
    rc = main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
               "--check", photo])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"check {PHOTOS[1]}.png: the exported model cannot run this" in err and "Guard failed" in err
    assert "Traceback" not in err


def test_config_override_reaches_the_export(fpn_model, tmp_path):
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    out = tmp_path / "model.ts"
    rc = main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "torchscript", "--output", str(out),
               "--set", "TEST.DETECTIONS_PER_IM", "3"])
    assert rc == 0
    image = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.jit.load(str(out))(image)[0]
    assert boxes.shape[0] <= 3


def test_test_time_augmentation_is_said_to_stay_out_of_the_export(fpn_model, tmp_path, capsys):
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    rc = main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
               "--set", "TEST.BBOX_AUG.ENABLED", "True", "TEST.BBOX_AUG.SCALES", "[1000]"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "note: TEST.BBOX_AUG (test-time augmentation, which train_net --auto turns on) are not part of the " \
           "exported model: it returns the plain run's detections at TEST.SCALE " in printed


def test_missing_files_and_bad_overrides_exit_2(fpn_model, tmp_path, capsys):
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    assert main(["--cfg", cfg, "--load_ckpt", str(tmp_path / "nope.pth"), "--format", "onnx",
                 "--output", str(tmp_path / "m.onnx")]) == 2
    assert "nope.pth: file not found" in capsys.readouterr().err
    assert main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
                 "--set", "TEST.NO_SUCH_KEY", "1"]) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err


def test_onnx_without_its_extra_says_what_to_install(fpn_model, tmp_path, capsys, monkeypatch):
    # torch.onnx raised its OnnxExporterError (a traceback, exit 1) when the onnx package is missing.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    cfg, ckpt = _checkpoint_and_cfg(fpn_model, tmp_path)
    assert main(["--cfg", cfg, "--load_ckpt", ckpt, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    assert "--format onnx needs onnx: pip install 'maskrcnn[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_tools_shim_runs_the_cli():
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--format" in res.stdout


def test_cfg_takes_a_packaged_config_name_as_the_other_tools_do(tmp_path, capsys):
    import torch

    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.predictor import load_config

    name = "quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"
    torch.manual_seed(0)
    ckpt = str(tmp_path / "model.pth")
    torch.save({"model": Generalized_RCNN(load_config(name)).state_dict()}, ckpt)
    assert main(["--cfg", name, "--load_ckpt", ckpt, "--format", "torchscript",
                 "--output", str(tmp_path / "m.ts")]) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "m.ts")
    assert main(["--cfg", "no/such/config", "--load_ckpt", ckpt, "--format", "torchscript",
                 "--output", str(tmp_path / "m2.ts")]) == 2
    assert "--cfg no/such/config: config file not found" in capsys.readouterr().err
