"""The fine-tuning example in docs/ runs as a user would run it (tiny settings: ResNet-18 body, small images)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.slow
def test_finetune_pennfudan_example_runs(shared_data, tmp_path):
    out = tmp_path / "pics"
    cmd = [sys.executable, os.path.join(REPO, "docs", "examples", "finetune_pennfudan.py"),
           "--root", os.path.join(shared_data, "PennFudanPed-sample"), "--epochs", "1", "--max_iters_per_epoch", "2",
           "--scale", "160", "--body", "R-18", "--num_test", "3", "--custom_anchors", "--custom_pooler",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epoch 0: box AP" in proc.stdout
    assert sorted(os.listdir(out)) == ["prediction_0.png", "prediction_1.png", "prediction_2.png"]
