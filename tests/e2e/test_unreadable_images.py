"""train_net on a COCO set with an unreadable image: fails before training starts naming the file, or skips it
under DATA_LOADER.SKIP_UNREADABLE (docs/reliability.md)."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")


def _coco(tmp_path):
    images, anns = [], []
    for i in range(3):
        name = f"img{i}.png"
        im = np.full((64, 80, 3), 40 * i, np.uint8)
        cv2.rectangle(im, (10, 10), (40, 50), (200, 30, 30), -1)
        cv2.imwrite(str(tmp_path / name), im)
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 80})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 31, 41], "area": 1271,
                     "iscrowd": 0, "segmentation": [[10, 10, 41, 10, 41, 51, 10, 51]]})
    (tmp_path / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # truncated PNG
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "box"}]}))
    return f"coco:{ann}:{tmp_path}"


def _train(spec, out, extra=()):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--cfg", SMOKE, "--dataset", spec,
           "--output_dir", str(out), "--set", "MODEL.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "1",
           "DATA_LOADER.NUM_THREADS", "0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_unreadable_image_fails_fast_or_is_skipped(tmp_path):
    spec = _coco(tmp_path)
    proc = _train(spec, tmp_path / "out1")
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "img1.png" in err and "Traceback" not in err
    assert not (tmp_path / "out1" / "model_final.pth").exists()
    proc = _train(spec, tmp_path / "out2", ["DATA_LOADER.SKIP_UNREADABLE", "True"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out2" / "model_final.pth").exists()
