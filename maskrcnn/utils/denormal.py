"""Flush float denormals to zero on the CPU, so that a training step does not slow down as its gradients shrink.

A float32 value under 1.2e-38 in magnitude (a denormal) is computed in microcode on x86 CPUs, tens of times slower
than a normal one. In a training step they come from gradients and activations that shrink towards zero; the
weights themselves stay normal. Measured on a 2-core Intel Xeon with AMX (R-50-FPN, batch 2 at 800x1066, the
``benchmarks/train_step.py`` model stepped repeatedly, ``benchmarks/denormal.py``): without flushing, the fp32
step grew from 10.4 s to 41-45 s over its first six steps; with flushing it stayed at 9.0-10.4 s
(docs/benchmarks.md, "Denormals").
torchvision's model slows down the same way. bf16 steps are not affected.

Flushing sets the CPU's FTZ/DAZ flags (``torch.set_flush_denormal``): denormal inputs and results become 0, which
changes a result only where a value was already below float32's normal range. The flags are per thread and new
threads inherit them, so this must run before torch starts its thread pool (the first parallel operation):
``tools/train_net.py`` and ``tools/test_net.py`` call :func:`flush_denormal` at start while ``FLUSH_DENORMAL``
is on (the default). A program of your own can call it first thing. On a CPU without these flags (not x86 with
SSE3) it does nothing and returns False.
"""
from __future__ import annotations

import torch

__all__ = ["NOT_FLUSHED", "all_threads_flush", "flush_denormal"]

#: float32 bit pattern 0x007FFFFF: the largest denormal, about 1.18e-38.
_LARGEST_DENORMAL_BITS = 0x007FFFFF
#: What the tools print when :func:`flush_denormal` returns False.
NOT_FLUSHED = ("FLUSH_DENORMAL: float denormals are not flushed to zero (the CPU has no FTZ/DAZ flags, or torch's "
               "thread pool started before the call, so not every thread would flush); fp32 training steps may "
               "slow down as gradients shrink. Set FLUSH_DENORMAL False to silence this.")


def flush_denormal(enabled: bool = True) -> bool:
    """Turn flushing of float denormals to zero on (``enabled``) or off for this thread and the threads it starts
    from now on.

    Returns whether every torch CPU thread now flushes (for ``enabled=False``: whether the CPU has the flags). False
    when the CPU has no FTZ/DAZ flags (``torch.set_flush_denormal`` refuses), or when torch's thread pool was
    started before this call: its worker threads keep their own flags, which a parallel multiplication of
    denormals shows (their part of the result stays non-zero). Flushing is then turned off again in this thread,
    so that no result depends on which thread computed it. Call it before the first parallel operation.
    """
    if not torch.set_flush_denormal(bool(enabled)):
        return False
    if not enabled or all_threads_flush():
        return True
    torch.set_flush_denormal(False)
    return False


def all_threads_flush() -> bool:
    """Whether a multiplication of denormals split over every torch CPU thread gives zeros in every part."""
    # Large enough that torch's elementwise loop splits it over the threads (its grain is 32768 elements).
    # Built from its bits: a float constant would itself be flushed to 0 on the calling thread.
    x = torch.full((max(1, torch.get_num_threads()) * 65536,), _LARGEST_DENORMAL_BITS, dtype=torch.int32)
    return bool(((x.view(torch.float32) * 0.5) == 0).all())
