"""Preemption: SIGTERM or SIGUSR1 stops training at the next iteration boundary with a checkpoint.

Cluster schedulers announce the end of a job with a signal some time before they kill it: SLURM sends SIGTERM at
the time limit or on preemption (then SIGKILL after ``KillWait``, 30 s by default) and, with
``#SBATCH --signal=USR1@120``, SIGUSR1 two minutes before; Kubernetes sends SIGTERM and kills after the grace period.
:class:`PreemptionHandler` turns these signals into a flag (the signal handler does nothing else: the step in
progress finishes normally) and :class:`PreemptionHook` looks at the flag after each iteration:

1. the processes agree (one all-reduce per iteration under DDP: a signal that reached only one rank stops them all,
   at the same iteration),
2. every rank takes part in writing ``model_<iterations done>.pth`` (and ``last_checkpoint``) as a periodic
   snapshot would,
3. :class:`Preempted` is raised; ``tools/train_net.py`` logs the checkpoint and exits with :data:`EXIT_PREEMPTED`
   (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later"), and ``--resume`` continues bit for bit.

The handler is installed before the data loader forks its workers, so the workers inherit it and survive the
signal (a scheduler signals every process of the job) instead of dying with it.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Dict, Iterable, Optional

from ..utils import distributed as dist_utils
from .hooks import HookBase

__all__ = ["EXIT_PREEMPTED", "PREEMPTION_SIGNALS", "Preempted", "PreemptionHandler", "PreemptionHook"]

#: Exit status of a run stopped by a preemption signal after writing its checkpoint (sysexits EX_TEMPFAIL).
EXIT_PREEMPTED = 75
#: The signals that request a checkpoint and a clean stop.
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")

logger = logging.getLogger("maskrcnn.preemption")


class Preempted(Exception):
    """Training stopped on a preemption signal; ``checkpoint`` is the file written (None off rank 0)."""

    def __init__(self, message: str, iteration: int, signal_name: str, checkpoint: Optional[str]):
        super().__init__(message)
        self.iteration = iteration
        self.signal_name = signal_name
        self.checkpoint = checkpoint


class PreemptionHandler:
    """Records the first of ``signals`` received; :meth:`install` replaces their handlers, :meth:`uninstall`
    puts the previous ones back.

    Only a flag, the signal's name and the time are set in the handler: logging or saving from a signal handler
    could interrupt the same code in the main thread (a held lock, a half-written file).
    """

    def __init__(self, signals: Iterable[str] = PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"PreemptionHandler: unknown signal {name!r} (e.g. 'SIGTERM', 'SIGUSR1')")
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.time()

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only: Python delivers signals there). Returns self."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install: signal handlers can only be set in the main thread")
        for name in self.signals:
            sig = getattr(signal, name)
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def request(self, signal_name: str = "SIGTERM") -> None:
        """Act as if ``signal_name`` had been received (tests, or code that wants a clean stop)."""
        if self.signal_name is None:
            self.signal_name = signal_name
            self.received_at = time.time()


class PreemptionHook(HookBase):
    """After each iteration: when any rank got a preemption signal, write a checkpoint and raise :class:`Preempted`.

    Register it after :class:`~maskrcnn.engine.hooks.PeriodicCheckpointer`. A signal that comes during the last
    iteration does not stop the run: it ends normally with ``model_final.pth``.

    Args:
        handler: the installed :class:`PreemptionHandler`.
        checkpointer: the run's :class:`~maskrcnn.utils.checkpoint.Checkpointer` (``save`` runs on every rank).
        cfg_yaml, extra: stored in the checkpoint, as the periodic ones.
    """

    def __init__(self, handler: PreemptionHandler, checkpointer, cfg_yaml: Optional[str] = None,
                 extra: Optional[Dict[str, Any]] = None):
        self.handler = handler
        self.checkpointer = checkpointer
        self.cfg_yaml = cfg_yaml
        self.extra = dict(extra or {})

    def _stop_requested(self) -> bool:
        # Every rank must reach the same decision, or those that stop would leave the others in a collective.
        return not dist_utils.all_true(not self.handler.requested)

    def after_step(self) -> None:
        if not self._stop_requested():
            return
        done = self.trainer.iter + 1
        name = self.handler.signal_name or "a signal on another rank"
        if done >= self.trainer.max_iter:
            logger.warning("received %s during the last iteration: finishing normally", name)
            return
        when = (time.strftime("%H:%M:%S", time.localtime(self.handler.received_at))
                if self.handler.received_at else "on another rank")
        logger.warning("received %s (at %s): writing a checkpoint after iteration %d and stopping",
                       name, when, done)
        path = self.checkpointer.save(f"model_{done:07d}", iteration=done, cfg_yaml=self.cfg_yaml, **self.extra)
        raise Preempted(f"preempted by {name} after {done} of {self.trainer.max_iter} iterations; "
                        f"checkpoint {path or '(written by rank 0)'}; continue with --resume", done, name, path)
