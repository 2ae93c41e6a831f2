"""flush_denormal: FTZ/DAZ in every torch CPU thread when called before the thread pool starts, and the tools call
it in time. Each case runs in a fresh process: the flags are per thread and the test process's pool already runs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maskrcnn.utils.denormal import NOT_FLUSHED

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no FTZ/DAZ flags")

# Denormal inputs built from their bits (a float constant would be flushed on the main thread), multiplied over
# two threads; prints how many results are non-zero and what flush_denormal returned.
_PROBE = textwrap.dedent("""
    import torch
    torch.set_num_threads(2)
    {before}
    from maskrcnn.utils.denormal import flush_denormal
    ok = flush_denormal({enabled})
    x = torch.full((1 << 20,), 0x007FFFFF, dtype=torch.int32).view(torch.float32)
    print(ok, int(((x * 0.5) != 0).sum()), x.numel())
""")


def _probe(before="", enabled=True):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _PROBE.format(before=before, enabled=enabled)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_called_first_every_thread_flushes():
    ok, nonzero, n = _probe()
    assert ok and nonzero == 0


def test_without_it_denormals_stay():
    ok, nonzero, n = _probe(enabled=False)
    assert ok and nonzero == n


def test_a_thread_pool_started_before_the_call_is_reported_and_nothing_flushes():
    # The worker thread would keep its own flags (its part of the product denormal): the call says so and turns
    # flushing off again in the calling thread, so that no result depends on the thread that computed it.
    ok, nonzero, n = _probe(before="(torch.ones(1 << 22) * 2).sum()")
    assert not ok and nonzero == n


def test_train_net_flushes_before_its_thread_pool_starts(tmp_path):
    # flush_denormal probes every thread; the tool prints NOT_FLUSHED when one of them was missed.
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--cfg", SMOKE, "--set",
                           "SOLVER.MAX_ITER", "1", "--output_dir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert NOT_FLUSHED not in proc.stderr
