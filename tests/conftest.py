import os
import random

import numpy as np
import pytest
import torch

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path of ../shared/data (real images that must never be copied into the repo)."""
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
