"""benchmarks/malloc.py: default and tuned children on the same model, and --code / --only."""
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import malloc as malloc_bench  # noqa: E402

from maskrcnn.cli.auto import load_auto_cfg  # noqa: E402
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_rounds_report_both_children_and_one_with_only(tmp_path, capsys):
    cfg = load_auto_cfg(None)
    cfg.MODEL.NUM_CLASSES = 4
    cfg.TRAIN.SCALES, cfg.TEST.SCALE, cfg.TRAIN.MAX_SIZE, cfg.TEST.MAX_SIZE = [96], 96, 96, 96
    cfg.TRAIN.IMS_PER_BATCH = 2
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(cfg.dump())
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": Generalized_RCNN(cfg).state_dict()}, ckpt)
    common = ["--cfg", str(cfg_path), "--load_ckpt", str(ckpt), "--dataset", "synthetic:basic:train", "--steps", "2",
              "--warm", "1", "--rounds", "1"]
    malloc_bench.main(common)
    out = capsys.readouterr().out
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert "round 1: default" in out and "| tuned" in out and f"(applied: {glibc})" in out
    assert "tuned / default step time: median" in out
    malloc_bench.main(common + ["--code", REPO, "--only", "default"])
    out = capsys.readouterr().out
    assert "round 1: default" in out and "faults/step" in out and REPO in out and "tuned" not in out
