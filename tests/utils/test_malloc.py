"""tune_malloc: glibc's mmap/trim thresholds, measured by the page faults of a loop that frees and re-allocates."""
import platform
import subprocess
import sys
import textwrap

import pytest

from maskrcnn.utils import tune_malloc

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_LOOP = textwrap.dedent("""
    import resource
    import torch
    from maskrcnn.utils import tune_malloc

    def faults_per_step(steps=20, numel=2 << 20):
        # A step's tensors (4 x 8 MiB, or 4 x 4 * numel bytes) allocated together at the heap's top, then all freed.
        def step():
            held = [torch.empty(numel).fill_(1.0) for _ in range(4)]
            del held
        for _ in range(2):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

    # Control: with a 1 MiB mmap threshold every 8 MiB tensor is mapped on allocation and unmapped when freed.
    low = tune_malloc(mmap_threshold=1 << 20, map_large=True)
    returned = faults_per_step()
    applied = tune_malloc()
    kept = faults_per_step()
    # 64 MiB tensors (a P2 feature map of a training step is 111 MB): above any mmap threshold glibc accepts, so
    # only M_MMAP_MAX = 0 keeps them.
    capped = tune_malloc(map_large=True)
    large_returned = faults_per_step(steps=5, numel=16 << 20)
    tune_malloc()
    large_kept = faults_per_step(steps=5, numel=16 << 20)
    print(low, returned, applied, kept, capped, large_returned, large_kept)
""")


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere tune_malloc does nothing and returns False")
def test_freed_blocks_are_kept_instead_of_faulting_in_fresh_pages():
    out = subprocess.run([sys.executable, "-c", _LOOP], capture_output=True, text=True, check=True).stdout.split()
    low, returned, applied, kept, capped = out[0], float(out[1]), out[2], float(out[3]), out[4]
    large_returned, large_kept = float(out[5]), float(out[6])
    assert low == applied == capped == "True"
    # Memory handed back is faulted in again on the next step (8192 pages of 4 KiB per step: 8196 here) ...
    assert returned > 1000
    # ... and none once freed memory is kept (0 here).
    assert kept < returned / 20
    # Blocks above 32 MiB are mapped whatever the threshold, unless no block is mapped on its own (16384 pages of
    # 4 KiB per 64 MiB tensor, 4 per step: 65540 here, against about 1200 kept).
    assert large_returned > 30000
    assert large_kept < large_returned / 20


@pytest.mark.skipif(GLIBC, reason="checks the no-op path of other C libraries")
def test_does_nothing_without_glibc():
    assert tune_malloc() is False


def test_rejects_non_positive_thresholds():
    with pytest.raises(ValueError, match="mmap_threshold=0"):
        tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold=-1"):
        tune_malloc(trim_threshold=-1)
