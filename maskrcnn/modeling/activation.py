"""ReLU after a head layer, in place when nothing else can hold the layer's output; a head's layer stack as one
module."""
from __future__ import annotations

from typing import List, Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["relu_after", "relu_stack", "run_fused_stack"]


def relu_after(y: Tensor, x: Tensor) -> Tensor:
    """``relu(y)`` where ``y`` is a layer's output for input ``x``.

    In place when ``y`` is not recorded by autograd (inference, or a frozen layer) and is not ``x`` itself (a layer
    replaced by ``nn.Identity`` returns its input, which the caller may still read): at 100 detections the ReLUs of
    an fp32 inference went from 42 to 10 ms of profiled time (``benchmarks/profile_call.py``), the out-of-place one
    allocating, and faulting in, a fresh 80 MB map for the mask head. Under autograd it stays out of place, so that
    no saved tensor is modified."""
    return F.relu(y, inplace=y is not x and not y.requires_grad)


def relu_stack(layers: List[nn.Module], flatten: bool = False) -> nn.Sequential:
    """``nn.Sequential(layer_1, ReLU, ..., layer_n, ReLU)`` (after ``nn.Flatten`` when ``flatten``) holding the given
    layer modules themselves: what a head's ``feature_stack()`` returns, the computation its ``forward`` runs after
    the RoI transform. A speed feature builds a replacement from it (``TEST.QUANTIZE int8``: one quantized graph,
    ReLUs fused, activations kept in int8 between the layers) and installs it as the head's ``fused_stack``."""
    mods: List[nn.Module] = [nn.Flatten(start_dim=1)] if flatten else []
    for layer in layers:
        mods += [layer, nn.ReLU()]
    return nn.Sequential(*mods)


def run_fused_stack(head: nn.Module, x: Tensor) -> Optional[Tensor]:
    """``head.fused_stack(x)`` when a speed feature installed one (see :func:`relu_stack`), else None."""
    stack = getattr(head, "fused_stack", None)
    return None if stack is None else stack(x)
