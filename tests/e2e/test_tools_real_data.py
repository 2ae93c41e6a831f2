"""train_net then test_net from the command line on the real data in ../shared/data (tiny settings)."""
import json
import os
import subprocess
import sys

import pytest

from maskrcnn.data.catalog import build_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")


def _run(tool, args):
    cmd = [sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--cfg", SMOKE] + args
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pennfudan", "labelme"])
def test_train_and_test_on_shared_data(kind, shared_data, tmp_path):
    if kind == "pennfudan":
        spec = f"pennfudan:{os.path.join(shared_data, 'PennFudanPed-sample')}:all"
    else:
        d = os.path.join(shared_data, "labelme-coco")
        spec = f"coco:{os.path.join(d, 'annotations.json')}:{d}"
    num_classes = len(build_dataset(spec, is_train=False).classes)
    sets = ["--set", "MODEL.NUM_CLASSES", str(num_classes), "SOLVER.MAX_ITER", "2", "TRAIN.SCALES", "[128]",
            "TRAIN.MAX_SIZE", "160", "TEST.SCALE", "128", "TEST.MAX_SIZE", "160"]
    out = tmp_path / "out"
    proc = _run("train_net", ["--dataset", spec, "--output_dir", str(out)] + sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = _run("test_net", ["--load_ckpt", str(out / "model_final.pth"), "--dataset", spec,
                             "--output_dir", str(tmp_path / "eval")] + sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    classes = build_dataset(spec, is_train=False).classes[1:]
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["bbox"]) == ({"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                                     "ARl"} | {f"AP-{c}" for c in classes})
