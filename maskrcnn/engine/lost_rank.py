"""A lost rank: when one process of a multi-process run dies, the others stop with an error naming it.

Why: a process killed by SIGKILL (the out-of-memory killer, a failed node, a scheduler) leaves its peers in a
collective. With gloo (CPU) they see "Connection closed by peer" at once, without saying whose; with NCCL they can
wait for the process group's timeout (30 min by default) before failing. Neither names the rank that is gone.

How: every process runs a daemon thread (:class:`LostRankWatchdog`) that increments its own heartbeat counter in
the rendezvous key-value store (the ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``, which torchrun's agent on the first
node hosts) every ``interval`` seconds, and watches the counter of the next rank (``(rank + 1) % world_size``, so
that the store's load does not grow with the square of the world size):

* **error path** (gloo): the main thread's collective fails; :meth:`LostRankWatchdog.raise_if_lost` reads every
  counter twice, a few intervals apart, and raises :class:`LostRankError` naming the ranks whose counter stood still
  (host and pid included). ``tools/train_net.py`` prints it as ``error: ...`` and exits with 1.
* **hang path** (NCCL, or any collective that does not fail): the watcher sees its neighbour's counter stand still
  for ``timeout`` seconds, posts the verdict in the store (so every rank learns it within one interval), logs it and,
  when the main thread does not pick it up within a few intervals (it is stuck in the collective), ends the process
  with exit status 1 (``os._exit``).

If the store itself stops answering for ``timeout`` seconds, the process that hosted it (torchrun's agent of the
first node, or rank 0 without torchrun) is gone, and the error says so.

A rank that finished cleanly marks itself done (:meth:`stop`) and is never reported. Keys are prefixed with
torchrun's restart count, so a restarted run does not read the counters of the previous attempt.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Dict, List, Optional

__all__ = ["LostRankError", "LostRankWatchdog", "EXIT_LOST_RANK"]

#: Exit status of a process that stops because a peer was lost (the tools' "training error" status).
EXIT_LOST_RANK = 1

logger = logging.getLogger("maskrcnn.lost_rank")


class LostRankError(RuntimeError):
    """Another process of the run is gone; ``ranks`` lists the lost ranks (empty when the store host is gone)."""

    def __init__(self, message: str, ranks: List[int]):
        super().__init__(message)
        self.ranks = list(ranks)


def _connect_store(timeout_s: float):
    """A new client of the rendezvous store (its own connection: the heartbeat thread never waits behind the
    process group's own use of the store), or the process group's store when no address is in the environment."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    return dist.distributed_c10d._get_default_store()


class LostRankWatchdog:
    """Heartbeat and watcher thread of one process (no-op with ``world_size`` 1 or ``timeout_s`` 0).

    Args:
        rank, world_size: this process in the process group.
        timeout_s: a rank whose heartbeat stands still this long is lost (cfg ``TRAIN.LOST_RANK_TIMEOUT``).
        interval_s: heartbeat period; default ``timeout_s / 10`` clamped to [0.5, 5] s.
        store: a ``torch.distributed.Store`` (default: a new client of the rendezvous store).
        exit_on_hang: end the process when the main thread does not pick up a verdict (tests pass False).
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float = 60.0, interval_s: Optional[float] = None,
                 store=None, exit_on_hang: bool = True):
        if float(timeout_s) < 0:
            raise ValueError(f"LostRankWatchdog: timeout_s must be >= 0 (0 disables), got {timeout_s}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else min(5.0, max(0.5, self.timeout_s / 10.0))
        self.enabled = self.world_size > 1 and self.timeout_s > 0
        self.exit_on_hang = exit_on_hang
        self._store = store
        self._prefix = f"maskrcnn/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._stop = threading.Event()
        self._claimed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.verdict: Optional[str] = None

    @classmethod
    def from_cfg(cls, cfg, rank: int, world_size: int) -> "LostRankWatchdog":
        return cls(rank, world_size, timeout_s=float(cfg.TRAIN.LOST_RANK_TIMEOUT))

    # --- store keys ------------------------------------------------------------------------------------------------
    def _key(self, what: str, rank: Optional[int] = None) -> str:
        return f"{self._prefix}{what}/{self.rank if rank is None else rank}"

    def _count(self, rank: int) -> int:
        return int(self._store.add(self._key("beat", rank), 0))  # add(key, 0) reads without blocking

    def _is_done(self, rank: int) -> bool:
        return bool(self._store.check([self._key("done", rank)]))

    def _who(self, rank: int) -> str:
        key = self._key("who", rank)
        if self._store.check([key]):
            return f"rank {rank} ({self._store.get(key).decode('utf-8', 'replace')})"
        return f"rank {rank}"

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> "LostRankWatchdog":
        """Publish this process's host and pid, and start the heartbeat thread. Returns self."""
        if not self.enabled:
            return self
        if self._store is None:
            self._store = _connect_store(max(self.timeout_s, 10.0))
        self._store.set(self._key("who"), f"host {socket.gethostname()}, pid {os.getpid()}")
        self._store.add(self._key("beat"), 1)
        self._thread = threading.Thread(target=self._run, name="maskrcnn-heartbeat", daemon=True)
        self._thread.start()
        logger.info("rank %d of %d (host %s, pid %d): heartbeat every %.1f s; a rank silent for %.0f s is reported "
                    "lost (TRAIN.LOST_RANK_TIMEOUT)", self.rank, self.world_size, socket.gethostname(), os.getpid(),
                    self.interval_s, self.timeout_s)
        return self

    def stop(self) -> None:
        """Mark this rank done (never reported lost) and end the thread."""
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        try:
            self._store.set(self._key("done"), "1")
        except Exception:  # noqa: BLE001 - the store may be gone at the end of a failed run; nothing to mark
            pass
        self._thread.join(timeout=self.interval_s * 2 + 1)
        self._thread = None

    def _run(self) -> None:
        watched = (self.rank + 1) % self.world_size
        last_value, last_change = -1, time.monotonic()
        store_ok_at = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._store.add(self._key("beat"), 1)
                verdict_key = f"{self._prefix}verdict"
                if self._store.check([verdict_key]):
                    self._found(self._store.get(verdict_key).decode("utf-8", "replace"), post=False)
                    return
                value = self._count(watched)
                if value != last_value:
                    last_value, last_change = value, now
                elif now - last_change > self.timeout_s and not self._is_done(watched):
                    self._found(f"{self._who(watched)} sent no heartbeat for {now - last_change:.0f} s "
                                f"(TRAIN.LOST_RANK_TIMEOUT = {self.timeout_s:g}): it was killed, ran out of memory "
                                f"or its node failed; see that rank's log and the scheduler's", post=True)
                    return
                store_ok_at = now
            except Exception as e:  # noqa: BLE001 - any store failure: it is unreachable
                if now - store_ok_at > self.timeout_s:
                    self._found(self._store_gone(e), post=False)
                    return

    def _store_gone(self, err: BaseException) -> str:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        host = ("the torchrun agent of the rendezvous host node" if os.environ.get("TORCHELASTIC_RUN_ID")
                else "rank 0")
        return (f"the rendezvous store at {where}, hosted by {host}, stopped answering "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}): that "
                f"process or its node is gone")

    def _found(self, message: str, post: bool) -> None:
        """Record the verdict, share it, log it, and end the process if the main thread does not take it."""
        self.verdict = message
        if post:
            try:
                self._store.set(f"{self._prefix}verdict", message)
            except Exception:  # noqa: BLE001 - the others will find out by themselves
                pass
        logger.error("lost a process: %s", message)
        if not self.exit_on_hang or self._claimed.wait(max(3 * self.interval_s, 5.0)):
            return
        # The main thread is stuck in a collective that will not return (NCCL waits for its own timeout).
        print(f"error: lost a process: {message}; this process (rank {self.rank}) stops", file=sys.stderr,
              flush=True)
        for h in logging.getLogger("maskrcnn").handlers:
            h.flush()
        os._exit(EXIT_LOST_RANK)

    # --- the main thread's side -------------------------------------------------------------------------------------
    def scan(self) -> List[int]:
        """Ranks (other than this one, not done) whose heartbeat does not move over three intervals."""
        ranks = [r for r in range(self.world_size) if r != self.rank]
        first: Dict[int, int] = {r: self._count(r) for r in ranks}
        time.sleep(max(3 * self.interval_s, 2.0))
        return [r for r in ranks if self._count(r) == first[r] and not self._is_done(r)]

    def raise_if_lost(self, error: BaseException) -> None:
        """Called with the exception a collective raised: raise :class:`LostRankError` (from ``error``) when a rank
        is gone or the store host is; return (the caller re-raises ``error``) when every peer is alive."""
        if not self.enabled or self._store is None:
            return
        self._claimed.set()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.verdict is None:
            try:
                lost = self.scan()
            except Exception as e:  # noqa: BLE001 - the store is gone: its host is the lost process
                raise LostRankError(f"lost a process: {self._store_gone(e)} (this rank's collective failed with: "
                                    f"{first_line})", []) from error
            if not lost:
                return
            self.verdict = (", ".join(self._who(r) for r in lost) + " stopped sending heartbeats: killed, out of "
                            "memory or its node failed; see that rank's log and the scheduler's")
            lost_ranks = lost
        else:
            lost_ranks = []
        message = f"lost a process: {self.verdict}; rank {self.rank} stops (its collective failed with: {first_line})"
        logger.error("%s", message)  # in this rank's log file too, not only on the console
        raise LostRankError(message, lost_ranks) from error
