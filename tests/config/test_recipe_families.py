"""Each recipe family trains with its own library's loss rules (docs/architecture.md, "Loss rules per recipe family"):
Detectron's divisors and box-loss beta in configs/baselines/, torchvision's in configs/torchvision/."""
import glob
import os

import pytest

from maskrcnn.config import get_cfg

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RULES = {
    "baselines": {"RPN.LOSS_NORMALIZATION": "detectron", "FAST_RCNN.SMOOTH_L1_BETA": 1.0},
    "torchvision": {"RPN.LOSS_NORMALIZATION": "torchvision", "FAST_RCNN.SMOOTH_L1_BETA": pytest.approx(1.0 / 9)},
}


@pytest.mark.parametrize("family", sorted(RULES))
def test_each_family_uses_its_own_loss_rules(family):
    paths = sorted(glob.glob(os.path.join(REPO, "configs", family, "*.yaml")))
    assert paths, f"no configs in configs/{family}"
    for path in paths:
        cfg = get_cfg()
        cfg.merge_from_file(path)
        got = {key: cfg[key.split(".")[0]][key.split(".")[1]] for key in RULES[family]}
        assert got == RULES[family], os.path.basename(path)
