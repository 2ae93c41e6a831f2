"""tune_malloc: glibc's mmap/trim thresholds, measured by the page faults of a loop that frees and re-allocates."""
import platform
import subprocess
import sys
import textwrap

import pytest

from maskrcnn.utils import tune_malloc
from maskrcnn.utils.malloc import MMAP_THRESHOLD

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

_LOOP = textwrap.dedent("""
    import random, resource
    import torch
    from maskrcnn.utils import tune_malloc

    def faults_per_step(steps=40):
        # A step's worth of tensors of varied sizes, held together, then freed in another order (as a training
        # loop does): glibc's dynamic mmap threshold does not follow such a mix.
        rng = random.Random(0)
        def step():
            held = [torch.empty(rng.randint(1 << 17, 1 << 22)).fill_(1.0) for _ in range(8)]  # 0.5 .. 16 MiB
            rng.shuffle(held)
            while held:
                held.pop()
        step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

    plain = faults_per_step()
    applied = tune_malloc()
    tuned = faults_per_step()
    print(plain, applied, tuned)
""")


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere tune_malloc does nothing and returns False")
def test_freed_blocks_are_reused_instead_of_faulting_in_fresh_pages():
    out = subprocess.run([sys.executable, "-c", _LOOP], capture_output=True, text=True, check=True).stdout.split()
    plain, applied, tuned = float(out[0]), out[1], float(out[2])
    assert applied == "True"
    # Thousands of fresh 4 KiB pages per step by default (1920 here on glibc 2.x with a 4 KiB page) ...
    assert plain > 500
    # ... and few once blocks up to 32 MiB come from the heap and freed memory is kept (56 here).
    assert tuned < plain / 10


@pytest.mark.skipif(GLIBC, reason="checks the no-op path of other C libraries")
def test_does_nothing_without_glibc():
    assert tune_malloc() is False


def test_rejects_non_positive_thresholds():
    with pytest.raises(ValueError, match="mmap_threshold=0"):
        tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold=-1"):
        tune_malloc(trim_threshold=-1)


def test_default_threshold_is_the_largest_glibc_takes():
    assert MMAP_THRESHOLD == 32 * 1024 * 1024
