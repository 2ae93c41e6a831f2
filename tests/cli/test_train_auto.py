"""train_net --auto end to end on a tiny COCO-format set (exported from the synthetic family): no --cfg needed, the
choices and the explicit keys land in OUTPUT_DIR/config.yaml, and test_net --cfg OUTPUT_DIR/config.yaml
--load_ckpt OUTPUT_DIR/model_final.pth evaluates that very model; the steps --budget times are real ones and an
explicit SOLVER.MAX_ITER wins over the budget (the budget arithmetic: tests/engine/test_auto_recipe.py)."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import yaml

from maskrcnn.cli import test_net, train_net
from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.data.datasets.synthetic_family import SyntheticFamilyDataset
from maskrcnn.data.export_coco import export_coco
from maskrcnn.engine.auto_recipe import time_training_steps, time_training_steps_alternated
from maskrcnn.engine.trainer import Trainer
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    specs = {}
    for split, n in (("train", 8), ("val", 4)):
        path = export_coco(SyntheticFamilyDataset("basic", split, num_images=n), str(root / split))
        specs[split] = f"coco:{path}:{root / split / 'images'}"
    return specs


SMALL = ["AUTO.MIN_INPUT_SIZE", "64", "AUTO.MAX_INPUT_SIZE", "64", "AUTO.STATS_MAX_IMAGES", "0"]


def test_auto_config_round_trip_through_test_net(tiny_coco, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_net.main(["--auto", "--dataset", tiny_coco["train"], "--output_dir", str(out), "--set",
                         "SOLVER.MAX_ITER", "3", "FPN.RPN_ANCHOR_START_SIZE", "24", *SMALL])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "auto: TRAIN.SCALES = [64]" in printed and "recall@0.5" in printed
    assert "auto: FPN.RPN_ANCHOR_START_SIZE = 24 kept (explicit)" in printed
    assert "auto: SOLVER.MAX_ITER = 3 kept (explicit)" in (out / "auto.txt").read_text()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["TRAIN"]["SCALES"] == [64] and saved["TEST"]["SCALE"] == 64
    assert saved["MODEL"]["NUM_CLASSES"] == 4 and saved["FPN"]["RPN_ANCHOR_START_SIZE"] == 24
    assert saved["MODEL"]["CONV_BODY"] == "FPN.fpn_ResNet18_conv5_body" and saved["AUTO"]["ENABLED"] is True
    assert saved["SOLVER"]["MAX_ITER"] == 3
    for aug in ("BBOX_AUG", "MASK_AUG"):  # one more test run at 1.25 x 64 px, which test_net below runs
        assert saved["TEST"][aug]["ENABLED"] is True
        assert saved["TEST"][aug]["SCALES"] == [80] and saved["TEST"][aug]["MAX_SIZE"] == 80
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert yaml.safe_load(ckpt["cfg"]) == saved  # the weights and the saved config describe the same model
    cfg = get_cfg()
    cfg.merge_from_file(str(out / "config.yaml"))  # every key loads back
    assert_and_infer_cfg(cfg, source=str(out / "config.yaml"))
    Generalized_RCNN(cfg).load_state_dict(ckpt["model"], strict=True)  # the config builds exactly these weights' model
    rc = test_net.main(["--cfg", str(out / "config.yaml"), "--load_ckpt", str(out / "model_final.pth"),
                        "--dataset", tiny_coco["val"], "--output_dir", str(tmp_path / "eval")])
    assert rc == 0
    assert ("test-time augmentation (TEST.*_AUG): the image at 64x64, and for boxes also at 80x80; for masks also at "
            "80x80") in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"}


def test_cfg_is_required_without_auto(capsys, tmp_path):
    assert train_net.main(["--dataset", "synthetic:basic:train", "--output_dir", str(tmp_path)]) == 2
    assert "--cfg is required" in capsys.readouterr().err


def test_auto_on_a_bad_or_crowd_only_set_is_a_config_error(tiny_coco, tmp_path, capsys):
    # --auto reads the training set before the run starts; what it cannot use is an exit 2 naming the set, not a
    # traceback.
    ann, images = tiny_coco["train"].split(":")[1:]
    data = json.loads(open(ann).read())
    for a in data["annotations"]:
        a["iscrowd"] = 1
    crowd = tmp_path / "crowd.json"
    crowd.write_text(json.dumps(data))
    rc = train_net.main(["--auto", "--dataset", f"coco:{crowd}:{images}", "--output_dir", str(tmp_path / "out"),
                         "--set", "TRAIN.FILTER_EMPTY_GT", "False"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no (non-crowd) object" in err and str(crowd) in err and "iscrowd 0" in err
    missing = tmp_path / "missing.json"
    assert train_net.main(["--auto", "--dataset", f"coco:{missing}", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--auto" in err and str(missing) in err and "not found" in err


def test_auto_trains_a_box_only_model_on_a_set_without_segmentations(tiny_coco, tmp_path, capsys):
    # Most detection sets have boxes only: --auto makes that a Faster R-CNN (unless MODEL.MASK_ON is given), which
    # test_net then evaluates on boxes; with some segmentations it stays a mask model.
    ann, images = tiny_coco["train"].split(":")[1:]
    data = json.loads(open(ann).read())
    for a in data["annotations"]:
        del a["segmentation"]
    n = len(data["annotations"])
    # A crowd region with its RLE is not a masked object: the set still has none.
    image = data["images"][0]
    crowd = np.zeros((image["height"], image["width"]), np.uint8, order="F")
    crowd[2:10, 3:12] = 1
    rle = mask_util.encode(crowd)
    rle["counts"] = rle["counts"].decode("ascii")
    data["annotations"].append({"id": 10 ** 6, "image_id": image["id"], "bbox": [3, 2, 9, 8], "area": 72.0,
                                "category_id": data["annotations"][0]["category_id"], "iscrowd": 1,
                                "segmentation": rle})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    spec = f"coco:{boxes}:{images}"
    out = tmp_path / "run"
    rc = train_net.main(["--auto", "--dataset", spec, "--output_dir", str(out), "--set", "SOLVER.MAX_ITER", "2",
                         *SMALL])
    assert rc == 0
    assert (f"auto: MODEL.MASK_ON = False  (none of the {n} objects of the training set has a segmentation"
            in capsys.readouterr().out)
    assert yaml.safe_load((out / "config.yaml").read_text())["MODEL"]["MASK_ON"] is False
    assert test_net.main(["--cfg", str(out / "config.yaml"), "--load_ckpt", str(out / "model_final.pth"),
                          "--dataset", spec, "--output_dir", str(tmp_path / "eval")]) == 0
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == {"bbox"}
    # MODEL.MASK_ON given: kept, and a mask model has no object to learn from.
    assert train_net.main(["--auto", "--dataset", spec, "--output_dir", str(tmp_path / "masked"), "--set",
                           "MODEL.MASK_ON", "True", *SMALL]) == 2
    assert "box-only annotations train a box-only model: MODEL.MASK_ON False" in capsys.readouterr().err
    # Some objects with a segmentation: a mask model, the others dropped.
    data["annotations"].pop()
    data["annotations"][0]["segmentation"] = json.loads(open(ann).read())["annotations"][0]["segmentation"]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="bad_segmentation"):
        rc = train_net.main(["--auto", "--dataset", f"coco:{mixed}:{images}", "--output_dir", str(tmp_path / "mix"),
                             "--set", "SOLVER.MAX_ITER", "1", *SMALL])
    assert rc == 0
    assert f"auto: MODEL.MASK_ON = True  (1 of the {n} objects have a segmentation" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "mix" / "config.yaml").read_text())["MODEL"]["MASK_ON"] is True


def test_timed_steps_are_real_training_steps(tmp_path):
    """The step timing --budget divides the time left by: real steps of the chosen model on the training set."""
    args = train_net.parse_args(["--auto", "--dataset", "synthetic:basic:train", "--output_dir", str(tmp_path),
                                 "--set", "AUTO.MIN_INPUT_SIZE", "64", "AUTO.MAX_INPUT_SIZE", "64",
                                 "AUTO.STATS_MAX_IMAGES", "8", "TRAIN.IMS_PER_BATCH", "2"])
    cfg = train_net.setup_cfg(args, 1, log=lambda m: None)
    times = time_training_steps(cfg, SyntheticFamilyDataset("basic", "train", num_images=4), "cpu", 2, n_warm=1)
    assert len(times) == 2 and all(0 < t < 60 for t in times)


def test_alternated_timing_interleaves_the_configs_on_the_same_batches(tmp_path, monkeypatch):
    """--auto's fp32/bf16 trial: one model per config, their steps alternate round by round (the first of each
    round rotating), and each model's loader yields the same batches in the same order."""
    args = train_net.parse_args(["--auto", "--dataset", "synthetic:basic:train", "--output_dir", str(tmp_path),
                                 "--set", "AUTO.MIN_INPUT_SIZE", "64", "AUTO.MAX_INPUT_SIZE", "64",
                                 "AUTO.STATS_MAX_IMAGES", "8", "TRAIN.IMS_PER_BATCH", "2"])
    cfg = train_net.setup_cfg(args, 1, log=lambda m: None)
    cfg16 = cfg.clone()
    cfg16.defrost()
    cfg16.TRAIN.AMP = "bf16"
    order, batches = [], {}
    run_step = Trainer.run_step

    def recording(self):
        order.append((self.amp, self.iter))
        run_step(self)
        batches.setdefault(self.amp, []).append(list(self.image_ids))

    monkeypatch.setattr(Trainer, "run_step", recording)
    (t32, d32), (t16, d16) = time_training_steps_alternated(
        [cfg, cfg16], SyntheticFamilyDataset("basic", "train", num_images=8), "cpu", 3, n_warm=1)
    assert len(t32) == len(t16) == len(d32) == len(d16) == 3
    assert order == [("", 0), ("bf16", 0), ("bf16", 1), ("", 1), ("", 2), ("bf16", 2), ("bf16", 3), ("", 3)]
    assert batches[""] == batches["bf16"] and len(batches[""]) == 4


def test_auto_lr_is_for_the_total_batch_under_torchrun_and_iter_size(tmp_path):
    """With 2 processes (torchrun) and 2 accumulated steps, --auto's BASE_LR is for the 4 x batch images of an
    optimizer step, and the linear scaling rule then leaves it alone (the total batch equals the config's)."""
    argv = ["--auto", "--dataset", "synthetic:basic:train", "--output_dir", str(tmp_path), "--set",
            "AUTO.MIN_INPUT_SIZE", "64", "AUTO.MAX_INPUT_SIZE", "64", "AUTO.STATS_MAX_IMAGES", "8"]
    lines = []
    one = train_net.setup_cfg(train_net.parse_args(argv), 1, log=lambda m: None)
    many = train_net.setup_cfg(train_net.parse_args(argv + ["--iter_size", "2"]), 2, log=lines.append)
    batch = one.TRAIN.IMS_PER_BATCH
    assert many.TRAIN.IMS_PER_BATCH == batch and one.SOLVER.BASE_LR == pytest.approx(0.005 * batch)
    assert many.SOLVER.BASE_LR == pytest.approx(0.005 * 4 * batch)
    assert many.SOLVER.MAX_ITER == one.SOLVER.MAX_ITER
    assert any(f"total batch ({4 * batch}: {batch} per process x 2 processes x 2 accumulated steps)" in line
               for line in lines)
    assert any(f"the total batch {4 * batch} equals the config's ({4 * batch})" in line for line in lines)


def test_budget_not_applied_over_an_explicit_max_iter(tiny_coco, tmp_path):
    out = tmp_path / "budget"
    rc = train_net.main(["--auto", "--budget", "90s", "--dataset", tiny_coco["train"], "--output_dir", str(out),
                         "--set", "SOLVER.MAX_ITER", "2", *SMALL])
    assert rc == 0
    lines = (out / "auto.txt").read_text()
    assert "auto: SOLVER.MAX_ITER = 2 kept (explicit); the 1.5 min budget is not applied" in lines
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["SOLVER"]["MAX_ITER"] == 2 and saved["AUTO"]["BUDGET_MINUTES"] == pytest.approx(1.5)


def test_resume_takes_the_schedule_of_the_saved_config(tiny_coco, tmp_path):
    """A checkpoint written before the budget hook moved the schedule holds the older lr steps; --auto --resume
    continues with the saved config.yaml's (the last one the hook wrote): the checkpointer's reconciliation (the
    config's schedule wins) with fit_budget keeping the saved schedule."""
    out = tmp_path / "resume"
    rc = train_net.main(["--auto", "--dataset", tiny_coco["train"], "--output_dir", str(out), "--set",
                         "SOLVER.MAX_ITER", "4", "TRAIN.SNAPSHOT_ITERS", "2", *SMALL])
    assert rc == 0
    first = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert first["scheduler"]["max_iter"] == 4
    # as the hook leaves it after moving the end of the run to 6 iterations, past the snapshot at 2
    (out / "model_final.pth").unlink()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["SOLVER"]["MAX_ITER"], saved["SOLVER"]["STEPS"] = 6, [0, 5, 6]
    saved["TRAIN"]["AMP"] = "bf16"  # as a first start that timed bf16 faster leaves it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    rc = train_net.main(["--auto", "--resume", "--dataset", tiny_coco["train"], "--output_dir", str(out),
                         "--set", *SMALL])
    assert rc == 0
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 6
    assert final["scheduler"]["max_iter"] == 6 and final["scheduler"]["steps"] == [0, 5, 6]
    log = (out / "log.txt").read_text()
    assert "auto: --resume: the schedule of" in log and "max_iter 4 -> 6" in log
    assert "(SOLVER.MAX_ITER 6, TRAIN.AMP 'bf16')" in log  # the precision is not timed again
    assert yaml.safe_load((out / "config.yaml").read_text())["TRAIN"]["AMP"] == "bf16"


def test_single_cpu_process_on_several_cores_is_told_about_torchrun(monkeypatch, tmp_path):
    from maskrcnn.cli import auto

    argv = ["--auto", "--dataset", "synthetic:basic:train", "--output_dir", str(tmp_path), "--no_cuda", "--set",
            "AUTO.MIN_INPUT_SIZE", "64", "AUTO.MAX_INPUT_SIZE", "64", "AUTO.STATS_MAX_IMAGES", "8"]
    for cores, world_size, expected in ((2, 1, "--nproc_per_node 2"), (8, 1, "OMP_NUM_THREADS=2 torchrun"),
                                        (1, 1, None), (2, 2, None)):
        monkeypatch.setattr(auto, "_cpu_cores", lambda: cores)
        lines = []
        train_net.setup_cfg(train_net.parse_args(argv), world_size, log=lines.append)
        hints = [line for line in lines if line.startswith("auto: note: one process")]
        assert (expected in hints[0]) if expected else not hints, (cores, world_size, hints)
