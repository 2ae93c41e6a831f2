"""Keep a ``train_net --auto --budget`` run inside its wall-clock budget while it trains.

:func:`~maskrcnn.engine.auto_recipe.fit_schedule_to_budget` sizes ``SOLVER.MAX_ITER`` from a few steps timed before
training, on a fresh model. Later steps cost more: once the RPN finds the objects, more foreground RoIs reach the
mask head (up to ``TRAIN.BATCH_SIZE_PER_IM x TRAIN.FG_FRACTION`` per image, several times the count at the first
steps), and other jobs may start on the machine. :class:`BudgetHook` measures the real pace at a few points of the
run (by default at 10%, 25%, 45% and 65% of it, all before the first learning-rate step at 80%) and moves the end of
the schedule so that training ends at the deadline: ``SOLVER.MAX_ITER`` and the learning-rate steps are re-fitted
(:func:`~maskrcnn.engine.auto_recipe.schedule_for`; the warm-up, already under way or done, is kept), logged, and
written to ``OUTPUT_DIR/config.yaml`` and into the checkpoints, so that ``--resume`` and ``test_net`` see the
schedule that ran.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence

from .hooks import HookBase

__all__ = ["BudgetHook"]


class BudgetHook(HookBase):
    """Re-fit the end of the schedule to a deadline from the measured step time.

    Args:
        deadline: ``time.time()`` at which training should end (the budget's start plus its length).
        check_at: fractions of the current ``max_iter`` at which the pace is measured; each must be below the
            first learning-rate step (the schedule's first decay), so that no decay moves once it happened.
        window: steps whose median time is the pace.
        margin: fraction of the time left kept for the final checkpoint and logging.
        on_change: ``callable(new_max_iter, new_steps)`` after a re-fit (train_net: update the config, rewrite
            ``config.yaml``); every hook with a ``cfg_yaml`` attribute gets the text it returns, if any.
        log: one line per re-fit.
        broadcast: shares rank 0's decision with every process (all ranks must re-fit alike).
        clock: the time source (tests).

    The trainer's ``max_iter`` and the scheduler's ``max_iter`` / ``steps`` are changed in place; the scheduler's
    state (checkpointed) carries them, so a resumed run continues with the re-fitted schedule.
    """

    def __init__(self, deadline: float, check_at: Sequence[float] = (0.10, 0.25, 0.45, 0.65), window: int = 20,
                 margin: float = 0.02, on_change: Optional[Callable[[int, List[int]], Optional[str]]] = None,
                 log: Optional[Callable[[str], Any]] = None, broadcast: Optional[Callable[[Any], Any]] = None,
                 clock: Callable[[], float] = time.time):
        if not all(0.0 < f < 1.0 for f in check_at):
            raise ValueError(f"BudgetHook: check_at fractions must be in (0, 1), got {list(check_at)}")
        self.deadline = float(deadline)
        self.check_at = sorted(float(f) for f in check_at)
        self.window = max(int(window), 1)
        self.margin = float(margin)
        self.on_change = on_change
        self.log = log
        self.broadcast = broadcast
        self.clock = clock
        self._times: Deque[float] = deque(maxlen=self.window)
        self._next = 0
        self.refits: List[dict] = []

    def before_train(self) -> None:
        # A resumed run skips the checks that lie behind it.
        self._skip_passed(int(self.trainer.start_iter))

    def _skip_passed(self, done: int) -> None:
        while self._next < len(self.check_at) and self.check_at[self._next] * self.trainer.max_iter <= done:
            self._next += 1

    def after_step(self) -> None:
        t = self.trainer
        if not t.step_skipped:
            self._times.append(float(t.step_time))
        done = t.iter + 1
        if self._next >= len(self.check_at) or done < self.check_at[self._next] * t.max_iter:
            return
        self._skip_passed(done)
        if len(self._times) >= min(self.window, 5):
            self._refit(done)

    def _refit(self, done: int) -> None:
        from .auto_recipe import schedule_for

        t = self.trainer
        sched = t.scheduler
        pace = statistics.median(self._times)
        left = self.deadline - self.clock()
        new_max = done + max(int((1.0 - self.margin) * left / pace), 1)
        if self.broadcast is not None:
            new_max = int(self.broadcast(new_max))
        first_step = min([s for s in getattr(sched, "steps", []) if s > 0] or [t.max_iter])
        plan = schedule_for(new_max)
        new_steps = [int(s) for s in plan["SOLVER.STEPS"]]
        later = [s for s in new_steps if s > 0]
        # No decay may move behind the iteration reached, nor one that already happened.
        if abs(new_max - t.max_iter) <= max(2, 0.02 * t.max_iter) or done >= first_step or \
                (later and later[0] <= done):
            return
        old = t.max_iter
        t.max_iter = new_max
        if hasattr(sched, "max_iter"):
            sched.max_iter = new_max
        if hasattr(sched, "steps"):
            sched.steps = new_steps
        self.refits.append({"iteration": done, "pace": pace, "left": left, "old": old, "new": new_max})
        if self.log is not None:
            self.log(f"auto: budget: at iteration {done} the median step takes {pace:.3f} s and {left:.0f} s are "
                     f"left: SOLVER.MAX_ITER {old} -> {new_max}, SOLVER.STEPS -> {new_steps}")
        text = self.on_change(new_max, new_steps) if self.on_change is not None else None
        if text is not None:
            for h in getattr(t, "hooks", []):
                if hasattr(h, "cfg_yaml"):
                    h.cfg_yaml = text
