"""glibc malloc settings that keep a training or inference loop off fresh pages.

A training step frees and re-allocates the same tensors every iteration. With glibc's defaults a block above the
(dynamic) mmap threshold, at most 32 MiB, is mapped on allocation and unmapped when freed, and the top of the heap
is returned to the kernel past 128 KiB of free space: the next step's tensors then land on fresh pages, which the
kernel must fault in and zero one 4 KiB page at a time. On `--auto`'s `thin` recipe (4 images of 128 px, one
thread) that was about 3,000-6,000 page faults per step and 5-15% of the step's time; on an R-50-FPN step at
800x1066 (batch 2), whose largest tensors (111 MB at P2) are far above any mmap threshold glibc accepts,
400,000-900,000 faults and 0.6-2 s of a 7-9 s step on two cores (docs/benchmarks.md, "Allocator").
:func:`tune_malloc` serves every block from the heap (no block is mapped on its own) and never gives the top of the
heap back, as jemalloc or tcmalloc (which ``python -m torch.backends.xeon.run_cpu`` preloads) would keep freed
memory.

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

#: With ``map_large=True``, blocks up to this size come from the heap (the ceiling of glibc's own dynamic
#: threshold on 64-bit, and the most some glibc versions accept).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap kept by the process before it is returned to the kernel; None: all of it.
TRIM_THRESHOLD: Optional[int] = None

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's own limit on the number of blocks mapped at once


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: Optional[int] = TRIM_THRESHOLD,
                map_large: bool = False) -> bool:
    """Set glibc malloc's mmap and trim settings for this process (``mallopt``).

    Args:
        mmap_threshold: bytes; with ``map_large``, larger blocks are still mapped and unmapped one by one (some
            glibc versions refuse values above 32 MiB on 64-bit: then this returns False).
        trim_threshold: bytes of free memory at the top of the heap the process keeps; None (the default), or a
            value above what a C ``int`` holds: all of it, the heap never shrinks.
        map_large: keep mapping blocks above ``mmap_threshold`` on their own (glibc's behaviour). False (the
            default) sets ``M_MMAP_MAX`` to 0: every block comes from the heap, so a freed 100 MB feature map is
            reused by the next step instead of unmapped and faulted in again.

    Returns:
        True when every setting was applied, False where malloc is not glibc's (nothing changes) or glibc
        refused a value. Affects allocations made after the call, in this process and processes forked from it.
    """
    if mmap_threshold <= 0 or (trim_threshold is not None and trim_threshold <= 0):
        raise ValueError(f"thresholds must be positive, got mmap_threshold={mmap_threshold}, "
                         f"trim_threshold={trim_threshold}")
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(int(mmap_threshold), 2**31 - 1)))
    # glibc reads the int as a size_t: -1 is the largest threshold, at which the heap is never trimmed.
    trim = -1 if trim_threshold is None or trim_threshold > 2**31 - 1 else int(trim_threshold)
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim)) and ok
    ok = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(_DEFAULT_MMAP_MAX if map_large else 0)) and ok
    return bool(ok)
