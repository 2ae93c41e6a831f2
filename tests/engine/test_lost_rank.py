"""maskrcnn.engine.lost_rank on its own: two watchdogs share an in-memory store; one rank "dies" (its heartbeat
thread stops without marking itself done) and the other names it, on the error path and on the hang path."""
import time

import pytest
import torch.distributed as dist

from maskrcnn.engine.lost_rank import LostRankError, LostRankWatchdog


def _pair(timeout_s=1.5, interval_s=0.1):
    store = dist.HashStore()
    return [LostRankWatchdog(r, 2, timeout_s=timeout_s, interval_s=interval_s, store=store, exit_on_hang=False)
            for r in range(2)]


def _kill(w):
    """Stop w's heartbeat the way SIGKILL would: no 'done' mark."""
    w._stop.set()
    w._thread.join()


def test_error_path_names_the_rank_whose_heartbeat_stopped():
    a, b = _pair()
    a.start(), b.start()
    try:
        time.sleep(0.3)
        assert a.scan() == []  # both alive: a failed collective is re-raised as it is
        a.raise_if_lost(RuntimeError("not a peer problem"))
        _kill(b)
        with pytest.raises(LostRankError, match=r"lost a process: rank 1 \(host .*, pid \d+\) stopped sending "
                                                r"heartbeats.*rank 0 stops \(its collective failed with: "
                                                r"Connection closed by peer\)") as info:
            a.raise_if_lost(RuntimeError("Connection closed by peer\nmore lines"))
        assert info.value.ranks == [1] and isinstance(info.value.__cause__, RuntimeError)
    finally:
        a.stop()


def test_hang_path_reports_within_the_timeout_and_shares_the_verdict():
    a, b = _pair(timeout_s=1.0)
    a.start(), b.start()
    t0 = time.monotonic()
    _kill(b)  # a watches rank 1
    while a.verdict is None and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    try:
        assert a.verdict is not None and "rank 1" in a.verdict and "no heartbeat for" in a.verdict
        assert 1.0 <= elapsed < 3.0
        with pytest.raises(LostRankError, match="rank 1"):
            a.raise_if_lost(RuntimeError("timeout"))
    finally:
        a.stop()


def test_a_rank_that_finished_is_never_reported_and_single_process_is_a_no_op():
    a, b = _pair(timeout_s=0.5)
    a.start(), b.start()
    b.stop()  # finished cleanly: marked done
    time.sleep(1.2)
    try:
        assert a.verdict is None and a.scan() == []
    finally:
        a.stop()
    solo = LostRankWatchdog(0, 1, timeout_s=10).start()
    assert not solo.enabled and solo._thread is None
    solo.raise_if_lost(RuntimeError("x"))  # nothing to explain: returns
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        LostRankWatchdog(0, 2, timeout_s=-1)
