"""train_net initialises the backbone from RESNETS.IMAGENET_PRETRAINED_WEIGHTS (a torchvision ResNet-18 file)."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")


def _train(out, weights, extra=()):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--cfg", SMOKE, "--dataset", "synthetic:train",
           "--output_dir", str(out), "--set", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.000001",
           "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", "True", "RESNETS.IMAGENET_PRETRAINED_WEIGHTS", str(weights),
           *extra]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_imagenet_backbone_initialisation(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    proc = _train(tmp_path / "out", path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sd = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    conv1 = [v for k, v in sd.items() if k.endswith("res1.conv1.weight")][0]
    # The stem is frozen or barely moved (lr 1e-6): it must be torchvision's conv1.
    torch.testing.assert_close(conv1, tv.conv1.weight, rtol=0, atol=1e-4)
    proc = _train(tmp_path / "out2", tmp_path / "missing.pth")
    assert proc.returncode != 0 and "IMAGENET_PRETRAINED_WEIGHTS" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
