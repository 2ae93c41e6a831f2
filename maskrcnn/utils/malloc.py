"""glibc malloc settings that keep a training or inference loop off fresh pages.

A training step frees and re-allocates the same tensors every iteration. With glibc's defaults a block above the
(dynamic) mmap threshold is mapped on allocation and unmapped when freed, and the top of the heap is returned to
the kernel past 128 KiB of free space: the next step's tensors then land on fresh pages, which the kernel must
fault in and zero one 4 KiB page at a time. On `--auto`'s `thin` recipe (4 images of 128 px, one thread) that is
about 3,000-6,000 page faults per step and 5-15% of the step's time (docs/benchmarks.md, "Allocator"). Serving
blocks up to 32 MiB from the heap and keeping up to 1 GiB of freed memory in the process removes them, as jemalloc
or tcmalloc (which ``python -m torch.backends.xeon.run_cpu`` preloads) would.

The cost is memory the process keeps after a peak instead of returning it: a long-running process holds its peak.
``tools/train_net.py`` and ``tools/test_net.py`` apply this at start when ``TUNE_MALLOC`` is on (the default); a
program of your own can call :func:`tune_malloc`. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from typing import Optional

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: Blocks up to this size come from the heap (the ceiling of glibc's own dynamic threshold on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap kept by the process before it is returned to the kernel.
TRIM_THRESHOLD = 1024 * 1024 * 1024

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (``mallopt``).

    Args:
        mmap_threshold: bytes; larger blocks are still mapped and unmapped one by one (some glibc versions refuse
            values above 32 MiB on 64-bit: then this returns False).
        trim_threshold: bytes of free memory at the top of the heap the process keeps.

    Returns:
        True when both settings were applied, False where malloc is not glibc's (nothing changes) or glibc
        refused a value. Affects allocations made after the call, in this process and processes forked from it.
    """
    if mmap_threshold <= 0 or trim_threshold <= 0:
        raise ValueError(f"thresholds must be positive, got mmap_threshold={mmap_threshold}, "
                         f"trim_threshold={trim_threshold}")
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(int(mmap_threshold), 2**31 - 1)))
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(int(trim_threshold), 2**31 - 1)))
    return bool(ok_mmap) and bool(ok_trim)
