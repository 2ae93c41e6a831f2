"""The command-line package: entry points declared in pyproject.toml, tools/*.py shims, shared helpers (``--cfg`` by
packaged name, one class-count check), and the single version source."""
import importlib
import os
import runpy
import subprocess
import sys

import pytest

from maskrcnn.cli import common
from maskrcnn.config import ConfigError, get_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_NAME = "quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"
SCRIPTS = {"maskrcnn-train": "maskrcnn.cli.train_net:main", "maskrcnn-test": "maskrcnn.cli.test_net:main",
           "maskrcnn-infer": "maskrcnn.cli.infer:main", "maskrcnn-export": "maskrcnn.cli.export:main",
           "maskrcnn-convert": "maskrcnn.cli.convert_weights:main", "maskrcnn-plot": "maskrcnn.cli.plot:main"}


def _pyproject():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_declares_the_console_scripts_and_each_is_a_main():
    assert _pyproject()["project"]["scripts"] == SCRIPTS
    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_cli_command_table_matches_pyproject_and_run_dispatches():
    from maskrcnn import cli

    assert {name: f"{module}:main" for name, module in cli.COMMANDS.items()} == SCRIPTS
    with pytest.raises(SystemExit) as e:
        cli.run("convert", ["--help"])
    assert e.value.code == 0
    with pytest.raises(ValueError, match="unknown command 'nope'"):
        cli.run("nope")


def test_version_has_one_source():
    from maskrcnn.version import __version__

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "maskrcnn.version.__version__"}
    assert __version__ == "0.2.0"
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        assert "version" not in f.read()


def test_license_is_an_spdx_expression_with_a_setuptools_that_supports_it():
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))  # PEP 639 forbids both
    assert "setuptools>=77" in data["build-system"]["requires"]


@pytest.mark.parametrize("tool, module, names", [("train_net", "train_net", ["main", "parse_args", "setup_cfg"]),
                                                 ("test_net", "test_net", ["main", "parse_args", "setup_cfg"]),
                                                 ("convert_weights", "convert_weights", ["main", "parse_args"]),
                                                 ("plot_curves", "plot", ["main", "parse_args"])])
def test_tools_are_shims_over_the_package(tool, module, names):
    shim = runpy.run_path(os.path.join(REPO, "tools", f"{tool}.py"))  # as a module, not as __main__
    package = importlib.import_module(f"maskrcnn.cli.{module}")
    for name in names:
        assert shim[name] is getattr(package, name)
    assert os.path.getsize(os.path.join(REPO, "tools", f"{tool}.py")) < 800  # no code of its own


def test_importing_the_cli_package_loads_no_tool_and_not_torch():
    # OMP_WAIT_POLICY is set in maskrcnn.cli before torch loads OpenMP; nothing on the way may import torch.
    code = ("import os, sys; import maskrcnn.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('maskrcnn.cli.')), 'torch' in sys.modules, "
            "os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False", "PASSIVE"], out.stdout + out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "ACTIVE"


def test_load_cfg_file_takes_a_packaged_name():
    cfg = common.load_cfg_file(SMOKE_NAME)
    assert cfg.SOLVER.MAX_ITER == 2 and cfg.MODEL.NUM_CLASSES == 4
    with pytest.raises(ConfigError, match="config file not found: no/such/config"):
        common.load_cfg_file("no/such/config")


def test_check_num_classes_names_both_counts_and_the_fix():
    from maskrcnn.data.catalog import build_dataset, check_num_classes

    cfg = get_cfg()
    cfg.MODEL.NUM_CLASSES = 3
    dataset = build_dataset("synthetic:val")
    with pytest.raises(ConfigError) as e:
        check_num_classes(cfg, dataset)
    msg = str(e.value)
    assert "MODEL.NUM_CLASSES = 3" in msg and "has 4 classes including the background" in msg
    assert "__background__" in msg and "--set MODEL.NUM_CLASSES 4" in msg
    cfg.MODEL.NUM_CLASSES = 4
    check_num_classes(cfg, dataset)
    check_num_classes(cfg, [1, 2, 3])  # a dataset without `classes` is not checked


def test_train_and_test_stop_on_a_class_count_mismatch_before_any_model_work(tmp_path, capsys):
    from maskrcnn.cli import test_net, train_net

    rc = train_net.main(["--cfg", SMOKE_NAME, "--dataset", "synthetic:train", "--nw", "0", "--output_dir",
                         str(tmp_path / "train"), "--set", "MODEL.NUM_CLASSES", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "MODEL.NUM_CLASSES = 3 but the dataset" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "train" / "model_final.pth")
    ckpt = tmp_path / "unused.pth"
    ckpt.write_bytes(b"\0" * 10)  # never read: the datasets are checked first
    rc = test_net.main(["--cfg", SMOKE_NAME, "--load_ckpt", str(ckpt), "--dataset", "synthetic:val", "--output_dir",
                        str(tmp_path / "test"), "--set", "MODEL.NUM_CLASSES", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "MODEL.NUM_CLASSES = 5 but the dataset" in err and "truncated" not in err


@pytest.mark.parametrize("tune", [True, False])
def test_train_and_test_tune_malloc_as_the_config_says(tmp_path, monkeypatch, capsys, tune):
    from maskrcnn.cli import common, test_net, train_net

    calls, tool = [], []
    monkeypatch.setattr(common, "tune_malloc", lambda: calls.append(tool[-1]))  # both tools call it from there
    # A class-count mismatch stops both right after the config is read (see the test above): enough to see the call.
    tool.append("train")
    rc = train_net.main(["--cfg", SMOKE_NAME, "--dataset", "synthetic:train", "--nw", "0", "--output_dir",
                         str(tmp_path / "train"), "--set", "MODEL.NUM_CLASSES", "3", "TUNE_MALLOC", str(tune)])
    ckpt = tmp_path / "unused.pth"
    ckpt.write_bytes(b"\0" * 10)
    tool.append("test")
    rc2 = test_net.main(["--cfg", SMOKE_NAME, "--load_ckpt", str(ckpt), "--dataset", "synthetic:val", "--output_dir",
                         str(tmp_path / "test"), "--set", "MODEL.NUM_CLASSES", "5", "TUNE_MALLOC", str(tune)])
    capsys.readouterr()
    assert rc == rc2 == 2
    assert calls == (["train", "test"] if tune else [])


def test_convert_weights_reports_a_bad_cfg_as_a_config_error(tmp_path, capsys):
    from maskrcnn.cli import convert_weights

    rc = convert_weights.main(["--src", "auto", "--input", str(tmp_path / "x.pkl"), "--output",
                               str(tmp_path / "y.pth"), "--cfg", "baselines/e2e_mask_rcnn_R50-FPN_1x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("config error: config file not found")
    assert "baselines/e2e_mask_rcnn_R-50-FPN_1x" in err  # the closest packaged name is suggested


@pytest.mark.parametrize("tool", ["train_net", "test_net", "convert_weights"])
def test_help_of_each_shim_mentions_packaged_config_names(tool):
    out = subprocess.run([sys.executable, os.path.join("tools", f"{tool}.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--cfg" in out.stdout and "baselines/e2e_mask_rcnn_R-50-FPN_1x" in out.stdout


def test_check_class_order():
    from maskrcnn.config import ConfigError
    from maskrcnn.data.catalog import check_class_order

    class Data:
        classes = ["__background__", "rect", "ell"]

    check_class_order(["__background__", "rect", "ell"], Data())       # the same order
    check_class_order(["__background__", "dog", "cat"], Data())        # other names: not this check's business
    check_class_order(None, Data())                                     # a checkpoint without names
    check_class_order(["__background__", "rect", "ell"], [1, 2])        # a dataset without classes
    with pytest.raises(ConfigError, match="another order") as e:
        check_class_order(["__background__", "ell", "rect"], Data())
    assert "1: 'ell' in the checkpoint, 'rect' in the dataset" in str(e.value)


def test_test_net_refuses_a_dataset_with_the_checkpoint_classes_in_another_order(tmp_path, capsys):
    # Category ids renumbered between the training and the test annotation files: every AP would be wrong.
    import torch

    from maskrcnn.cli import test_net
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.predictor import load_config
    from maskrcnn.utils.checkpoint import save_checkpoint

    cfg = load_config(SMOKE_NAME)
    ckpt = str(tmp_path / "model_final.pth")
    save_checkpoint(ckpt, {"model": Generalized_RCNN(cfg).state_dict(), "cfg": cfg.dump(),
                           "classes": ["__background__", "ellipse", "rectangle", "triangle"]})
    rc = test_net.main(["--cfg", SMOKE_NAME, "--load_ckpt", ckpt, "--dataset", "synthetic:val", "--output_dir",
                        str(tmp_path / "test")])
    err = capsys.readouterr().err
    assert rc == 2 and "another order" in err and "'ellipse' in the checkpoint" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "test" / "bbox_results.json")


@pytest.fixture(scope="module")
def box_only_coco(tmp_path_factory):
    """A 3-class COCO json exported from the synthetic set, its segmentations removed, and the same set with every
    object a crowd region."""
    import json

    from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
    from maskrcnn.data.export_coco import export_coco

    root = tmp_path_factory.mktemp("box_only")
    path = export_coco(SyntheticShapesDataset("val", num_images=4), str(root))
    data = json.loads(open(path).read())
    for a in data["annotations"]:
        del a["segmentation"]
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps(data))
    for a in data["annotations"]:
        a["iscrowd"] = 1
    crowd = root / "crowd.json"
    crowd.write_text(json.dumps(data))
    return {"boxes": f"coco:{boxes}:{root / 'images'}", "crowd": f"coco:{crowd}:{root / 'images'}"}


def test_train_net_refuses_a_set_without_an_object_to_learn(box_only_coco, tmp_path, capsys):
    # Every object a crowd region (as some RLE exporters write them): the box losses were 0 and the run exited 0.
    from maskrcnn.cli import train_net

    rc = train_net.main(["--cfg", SMOKE_NAME, "--dataset", box_only_coco["crowd"], "--output_dir", str(tmp_path),
                         "--set", "MODEL.MASK_ON", "False", "TRAIN.FILTER_EMPTY_GT", "False", "SOLVER.MAX_ITER", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no object to train on" in err and "iscrowd 0" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_test_net_gives_a_mask_model_its_box_ap_on_a_box_only_json(box_only_coco, tmp_path, capsys):
    # The test set was refused (every object dropped for a mask model), and MODEL.MASK_ON False, which the
    # message suggested, no longer fits the checkpoint. The evaluation reads the json: boxes are scored.
    import json

    from maskrcnn.cli import test_net
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.predictor import load_config
    from maskrcnn.utils.checkpoint import save_checkpoint

    cfg = load_config(SMOKE_NAME)
    ckpt = str(tmp_path / "model_final.pth")
    save_checkpoint(ckpt, {"model": Generalized_RCNN(cfg).state_dict(), "cfg": cfg.dump()})
    rc = test_net.main(["--cfg", SMOKE_NAME, "--load_ckpt", ckpt, "--dataset", box_only_coco["boxes"],
                        "--output_dir", str(tmp_path / "test"), "--set", "TEST.SCORE_THRESH", "0.0"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"} and metrics["bbox"]["AP"] is not None
    assert "have no usable segmentation; the mask AP ignores them" in capsys.readouterr().out
