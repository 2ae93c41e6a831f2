"""Facts about an ``nn.Module`` that several layers need (the device its tensors live on)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer, else ``cpu``.

    A model is assumed to live on one device (as every model this package builds does); a module with neither
    parameters nor buffers (a parameter-free stand-in in tests, an empty ``nn.Sequential``) runs on the CPU.
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
