"""Keypoint R-CNN learns: tools/train_net.py on the keypoint quick schedule, shortened (``SHORT_SCHEDULE``: 150 of
its 700 iterations, learning-rate steps and warm-up scaled with it), then tools/test_net.py on the saved config,
as a user runs them; asserts floors on keypoint AP (pycocotools' OKS) and box AP on synthetic:keypoints:val.

The floors are about half of the lowest of two seeds of exactly this command (below); a model whose keypoint head
learns nothing scores about 0 keypoint AP."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "quick_schedules", "e2e_keypoint_rcnn_R-18-FPN_synthetic_cpu.yaml")
SHORT_SCHEDULE = ["SOLVER.MAX_ITER", "150", "SOLVER.STEPS", "[0, 114, 137]", "SOLVER.WARM_UP_ITERS", "21"]
#: Seeds 1 / 2 of this command at 0fa32b8 (2026-12-04): keypoints AP 24.19 / 27.44, box AP 21.34 / 26.56.
AP_FLOOR = {"keypoints": 12.0, "bbox": 10.0}


@pytest.mark.slow
def test_keypoint_short_schedule_reaches_ap_floor(tmp_path):
    out = tmp_path / "kps"
    train = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--cfg", CONFIG,
                            "--output_dir", str(out), "--set", "RNG_SEED", "1"] + SHORT_SCHEDULE, cwd=REPO,
                           capture_output=True, text=True, timeout=1500)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    test = subprocess.run([sys.executable, os.path.join(REPO, "tools", "test_net.py"), "--cfg",
                           str(out / "config.yaml"), "--load_ckpt", str(out / "model_final.pth")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    with open(out / "test" / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    print(f"keypoints AP {metrics['keypoints']['AP']:.2f}, box AP {metrics['bbox']['AP']:.2f}")
    for iou_type, floor in AP_FLOOR.items():
        assert metrics[iou_type]["AP"] >= floor, (iou_type, metrics[iou_type]["AP"], floor)
