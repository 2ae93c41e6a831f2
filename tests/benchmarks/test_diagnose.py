"""benchmarks/diagnose.py: one row per ground-truth box, BatchNorm running vs batch statistics, and the CLI."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import diagnose  # noqa: E402

from maskrcnn.cli.auto import load_auto_cfg  # noqa: E402
from maskrcnn.data.datasets.synthetic_family import SyntheticFamilyDataset  # noqa: E402
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN  # noqa: E402


def _model(norm: str):
    cfg = load_auto_cfg(None)
    cfg.MODEL.NUM_CLASSES = 4
    cfg.RESNETS.NORM = norm
    cfg.TRAIN.SCALES, cfg.TEST.SCALE, cfg.TRAIN.MAX_SIZE, cfg.TEST.MAX_SIZE = [128], 128, 128, 128
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg).eval()
    with torch.no_grad():  # running statistics far from any image's, so that the two modes must differ for BN
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 4.0)
    return cfg, model


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_rows_and_norm_statistics(norm):
    cfg, model = _model(norm)
    data = SyntheticFamilyDataset("basic", "val", num_images=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    running = diagnose.diagnose(model, data, 3)
    batch = diagnose.diagnose(model, data, 3, batch_stats=True)
    n_boxes = sum(int((data[i][1]["iscrowd"] == 0).sum()) for i in range(3))
    assert len(running) == len(batch) == n_boxes > 0
    for r in running:
        assert 0.0 <= r["p_true"] <= 1.0 and 0.0 <= r["p_bg"] <= 1.0 and r["p_true"] + r["p_bg"] <= 1.0 + 1e-6
        assert r["size"] > 0 and r["label"] in (1, 2, 3)
    # the model itself is untouched (the batch-statistics pass runs on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    diff = max(abs(a["p_true"] - b["p_true"]) for a, b in zip(running, batch))
    if norm == "GN":
        assert diff < 1e-6  # GroupNorm: the same in both modes
    else:
        assert diff > 1e-3


def test_cli(tmp_path, capsys):
    cfg, model = _model("BN")
    cfg_path, ckpt = tmp_path / "config.yaml", tmp_path / "model.pth"
    cfg_path.write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, ckpt)
    assert diagnose.main(["--cfg", str(cfg_path), "--load_ckpt", str(ckpt), "--dataset", "synthetic:basic:val",
                          "--images", "2", "--by-image"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm with its running averages" in out and "BatchNorm with each image's statistics" in out
    assert "rpn_recall" in out and "class " in out
