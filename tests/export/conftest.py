"""Fixtures of the export tests: seeded FPN and C4 models with separated scores, and two real photos."""
import os
import sys

import cv2
import pytest
import torch

from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

sys.path.insert(0, os.path.dirname(__file__))
from export_models import PHOTOS, REPO, c4_cfg, fpn_cfg, scaled  # noqa: E402


@pytest.fixture(scope="module")
def fpn_model():
    torch.manual_seed(0)
    return scaled(Generalized_RCNN(fpn_cfg()))


@pytest.fixture(scope="module")
def c4_model():
    torch.manual_seed(1)
    return scaled(Generalized_RCNN(c4_cfg()))


@pytest.fixture(scope="module")
def photos():
    root = os.path.join(REPO, "..", "shared", "data", "PennFudanPed-sample", "PNGImages")
    if not os.path.isdir(root):
        pytest.fail(f"shared data folder not found at {root}")
    out = []
    for name in PHOTOS:
        bgr = cv2.imread(os.path.join(root, name + ".png"))
        out.append(torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).contiguous())
    return out
