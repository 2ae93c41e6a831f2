"""The package as a user installs it: build the sdist and the wheel, install the wheel into a fresh virtual
environment outside the checkout, and run the console scripts there with packaged config names.

How the fresh environment gets its dependencies: reinstalling the pinned torch/torchvision pair (6 GB) for every run
is out of proportion, so the new venv (``python -m venv --without-pip``, the wheel installed into it with the running
pip's ``--python``, ``--no-deps --no-index``) gets one ``.pth`` file listing the running environment's site-packages
folders: the same pinned torch pair and the other dependencies. Folders added by a ``.pth`` line are only appended to
``sys.path``; the ``.pth`` files inside them are not run, so the checkout's editable-install finder stays inactive.
Every command runs with ``cwd`` in ``tmp_path`` and without ``PYTHONPATH``, so the checkout is not on ``sys.path``
either; the tests assert that ``maskrcnn`` is imported from the new venv and its configs from the wheel.

The build runs on a copy of the files an sdist is made from (a build in the checkout would leave ``build/`` there,
whose stale modules a later build would ship), with the running environment's setuptools (no build isolation, no
network): sdist first, then the wheel from the sdist, as ``python -m build`` does.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile

import pytest
import torch

from maskrcnn.config import list_packaged_configs
from maskrcnn.version import __version__

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_NAME = "quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"
SCRIPTS = ("maskrcnn-train", "maskrcnn-test", "maskrcnn-infer", "maskrcnn-export", "maskrcnn-convert", "maskrcnn-plot")
SDIST_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "maskrcnn", "configs")


def _clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                 "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _check(cmd, cwd, env=None, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src, dist = root / "src", root / "dist"
    src.mkdir()
    for name in SDIST_INPUTS:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    _check([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
           cwd=src)
    (sdist,) = glob.glob(str(dist / "maskrcnn-*.tar.gz"))
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
            sdist], cwd=root)
    (wheel,) = glob.glob(str(dist / "maskrcnn-*.whl"))

    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", wheel],
           cwd=root)
    site = _check([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(site.stdout.strip(), "_maskrcnn_test_dependencies.pth"), "w", encoding="utf-8") as f:
        f.write("".join(f"{d}\n" for d in deps))
    run_dir = root / "run"
    run_dir.mkdir()
    return types.SimpleNamespace(wheel=wheel, sdist=sdist, venv=venv, python=python, bin=venv / "bin", cwd=run_dir)


@pytest.fixture(scope="module")
def trained(installed):
    """``maskrcnn-train`` for the smoke config's 2 iterations on the synthetic set, named as a packaged config."""
    out = installed.cwd / "train"
    r = _check([str(installed.bin / "maskrcnn-train"), "--cfg", SMOKE_NAME, "--dataset", "synthetic:train",
                "--nw", "0", "--output_dir", str(out)], cwd=installed.cwd)
    return types.SimpleNamespace(out=out, result=r)


def test_sdist_and_wheel_carry_the_configs_and_the_metadata(installed):
    configs = [f"maskrcnn/configs/{n}.yaml" for n in list_packaged_configs()]
    assert len(configs) >= 8
    import tarfile

    with tarfile.open(installed.sdist) as t:
        sdist_names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"configs/{n}.yaml" for n in list_packaged_configs()} <= sdist_names
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        info = f"maskrcnn-{__version__}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert set(configs) <= names
    assert "maskrcnn/cli/train_net.py" in names and "maskrcnn/version.py" in names
    assert not any(n.startswith(("tools/", "tests/", "configs/")) for n in names)
    assert f"Version: {__version__}\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    for script in SCRIPTS:
        assert f"{script} = maskrcnn.cli." in entry_points


def test_the_installed_package_is_the_wheels_not_the_checkouts(installed):
    code = ("import importlib.metadata, maskrcnn, torch; from maskrcnn.config import resolve_config_path; "
            f"print(maskrcnn.__file__); print(resolve_config_path({SMOKE_NAME!r})); "
            "print(importlib.metadata.version('maskrcnn')); print(torch.__version__)")
    lines = _check([str(installed.python), "-c", code], cwd=installed.cwd).stdout.split()
    venv = os.path.realpath(installed.venv)
    assert os.path.realpath(lines[0]).startswith(venv + os.sep), lines[0]
    assert os.path.realpath(lines[1]).startswith(venv + os.sep) and lines[1].endswith(
        os.path.join("maskrcnn", "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")), lines[1]
    assert lines[2] == __version__
    assert lines[3] == torch.__version__  # the same pinned torch as the running environment


def test_maskrcnn_train_runs_from_a_packaged_config_name(trained):
    for name in ("model_final.pth", "config.yaml", "log.txt"):
        assert (trained.out / name).exists(), name
    ckpt = torch.load(str(trained.out / "model_final.pth"), map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["model"]
    assert "iter 2/2" in (trained.out / "log.txt").read_text()


def test_maskrcnn_test_evaluates_the_trained_checkpoint(installed, trained):
    out = installed.cwd / "test"
    _check([str(installed.bin / "maskrcnn-test"), "--cfg", SMOKE_NAME + ".yaml", "--load_ckpt",
            str(trained.out / "model_final.pth"), "--dataset", "synthetic:val", "--range", "0", "4", "--output_dir",
            str(out)], cwd=installed.cwd)
    assert (out / "metrics.json").exists() and (out / "bbox_results.json").exists()


def test_maskrcnn_infer_draws_a_photo(installed, trained, shared_data):
    import cv2

    photo = os.path.join(shared_data, "PennFudanPed-sample", "PNGImages", "FudanPed00001.png")
    out = installed.cwd / "vis"
    _check([str(installed.bin / "maskrcnn-infer"), "--cfg", SMOKE_NAME, "--load_ckpt",
            str(trained.out / "model_final.pth"), "--images", photo, "--output_dir", str(out)], cwd=installed.cwd)
    pictures = sorted(os.listdir(out))
    assert len(pictures) == 1 and pictures[0].startswith("FudanPed00001"), pictures
    drawn = cv2.imread(str(out / pictures[0]))
    assert drawn is not None and drawn.ndim == 3 and drawn.shape[0] > 100 and drawn.shape[1] > 100


def test_maskrcnn_plot_draws_the_installed_run_s_curves(installed, trained):
    pytest.importorskip("matplotlib", reason="the optional plot extra (pinned in requirements-dev.txt)")
    r = _check([str(installed.bin / "maskrcnn-plot"), str(trained.out)], cwd=installed.cwd)
    assert "1 run(s), 6 loss and 0 AP curve(s)" in r.stdout  # total + 5 losses of metrics.jsonl; no evaluation
    assert (trained.out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help(installed, script):
    r = _check([str(installed.bin / script), "--help"], cwd=installed.cwd)
    assert "usage:" in r.stdout
