"""BudgetHook: the end of an --auto schedule follows the measured pace so that training ends at the deadline."""
import pytest
import torch

from maskrcnn.engine.auto_recipe import schedule_for
from maskrcnn.engine.budget import BudgetHook
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR
from maskrcnn.engine.trainer import Trainer


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Step(torch.nn.Module):
    """A 'model' whose step advances the fake clock by ``cost(iteration)`` seconds and reports it as step_time."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss": (self.w * images[0].sum()).abs()}


class TimedTrainer(Trainer):
    def __init__(self, clock, cost, **kw):
        super().__init__(**kw)
        self.clock, self.cost = clock, cost

    def run_step(self):
        super().run_step()
        self.step_time = self.cost(self.iter)
        self.clock.now += self.step_time


def _loader():
    while True:
        yield [torch.ones(1, 2, 2)], [{}]


def _run(cost, max_iter=200, budget=100.0, start_iter=0, **hook_kw):
    clock = Clock()
    model = Step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = schedule_for(max_iter)
    sched = WarmupMultiStepLR(opt, LRSchedule(base_lr=0.1, policy="steps_with_decay", steps=plan["SOLVER.STEPS"],
                                              warmup_iters=plan["SOLVER.WARM_UP_ITERS"], max_iter=max_iter))
    changes, lines = [], []
    hook = BudgetHook(clock.now + budget, on_change=lambda m, s: changes.append((m, s)) or "cfg text",
                      log=lines.append, clock=clock, **hook_kw)
    t = TimedTrainer(clock, cost, model=model, optimizer=opt, scheduler=sched, data_loader=_loader(),
                     max_iter=max_iter, start_iter=start_iter, hooks=[hook])
    hook.cfg_yaml = None
    t.train()
    return t, sched, hook, clock, changes, lines


def test_slower_steps_end_the_run_at_the_deadline():
    # 200 iterations were planned at 0.5 s (100 s); steps soon take 1.0 s: the run is shortened to end on time.
    t, sched, hook, clock, changes, lines = _run(lambda i: 0.5 if i < 10 else 1.0)
    assert t.iter == t.max_iter < 200 and hook.refits
    assert 1000.0 + 100.0 * 0.95 <= clock.now <= 1000.0 + 100.0
    assert sched.max_iter == t.max_iter and sched.steps == schedule_for(t.max_iter)["SOLVER.STEPS"]
    assert changes[-1] == (t.max_iter, sched.steps)
    assert lines[0].startswith("auto: budget: at iteration 20 the median step takes")
    assert hook.cfg_yaml == "cfg text"  # hooks holding the config text get the re-fitted one
    # the decays happened at the re-fitted steps: the lr at the end is base * 0.1 ** 2
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * 0.01)


def test_faster_steps_lengthen_the_run_and_steady_steps_change_nothing():
    t, _, _, clock, _, _ = _run(lambda i: 0.25)
    assert t.max_iter > 350 and 1095.0 <= clock.now <= 1100.0
    t, _, hook, clock, changes, _ = _run(lambda i: 0.5)
    assert t.max_iter == 200 and not hook.refits and not changes


def test_no_refit_after_the_first_decay_and_resume_skips_passed_checks():
    # checks at 85% lie after the first decay (80%): never used
    t, _, hook, _, _, _ = _run(lambda i: 1.0, check_at=(0.85,))
    assert t.max_iter == 200 and not hook.refits
    # a run resumed at iteration 120 (60%) only uses the 65% check
    t, _, hook, _, _, _ = _run(lambda i: 1.0, start_iter=120)
    assert [r["iteration"] for r in hook.refits] == [130]
    with pytest.raises(ValueError, match="check_at"):
        BudgetHook(0.0, check_at=(0.5, 1.0))
