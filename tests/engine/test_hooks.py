"""maskrcnn.engine.hooks on its own: hooks driven by a stand-in trainer (plain attributes), plus the call order
that the real Trainer promises them."""
import logging
import sys
import types
from typing import Dict, List, Optional

import pytest
import torch
from torch import nn

from maskrcnn.engine.hooks import HookBase, LogHook, PeriodicCheckpointer, TensorboardWriter
from maskrcnn.engine.trainer import Trainer


class _FakeTrainer:
    """The attributes hooks read from a Trainer, set by hand."""

    def __init__(self, max_iter: int, start_iter: int = 0):
        self.max_iter, self.start_iter, self.iter = max_iter, start_iter, start_iter
        self.device = torch.device("cpu")
        self.losses: Dict[str, float] = {}
        self.total_loss = float("nan")
        self.lr = 0.02
        self.step_time = self.data_time = 0.0
        self.step_skipped = False
        self.grad_norm: Optional[float] = None
        self.skipped_steps = 0


def _drive(hooks, trainer, steps):
    """Run hooks the way Trainer.train does; ``steps[i]`` sets the trainer's attributes of iteration i."""
    for h in hooks:
        h.trainer = trainer
        h.before_train()
    for it in range(trainer.start_iter, trainer.max_iter):
        trainer.iter = it
        for h in hooks:
            h.before_step()
        for k, v in steps[it - trainer.start_iter].items():
            setattr(trainer, k, v)
        for h in hooks:
            h.after_step()
    for h in hooks:
        h.after_train()
        h.close()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: List[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _logger(name):
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Lines()
    logger.addHandler(handler)
    return logger, handler


class _RecordingWriter:
    def __init__(self):
        self.calls, self.closed = [], False

    def add_scalars(self, values, step):
        self.calls.append((step, dict(values)))

    def close(self):
        self.closed = True


def _step(loss_a, loss_b, time=0.5, data=0.1, **extra):
    return dict(losses={"loss_a": loss_a, "loss_b": loss_b}, total_loss=loss_a + loss_b, step_time=time,
                data_time=data, **extra)


# --- LogHook ------------------------------------------------------------------------------------------------------
def test_log_hook_writes_every_period_and_at_the_last_iteration_with_window_medians():
    logger, out = _logger("test.hooks.period")
    writer = _RecordingWriter()
    hook = LogHook(period=3, logger=logger, tb_writer=writer, show_bar=False)
    steps = [_step(1.0, 10.0, time=100.0), _step(3.0, 30.0, time=0.5), _step(2.0, 20.0, time=0.7),
             _step(5.0, 50.0, time=0.2), _step(4.0, 40.0, time=0.4)]
    _drive([hook], _FakeTrainer(max_iter=5), steps)
    assert len(out.lines) == 2  # after iterations 3 and 5 (the last one)
    first, last = out.lines
    assert first.startswith("iter 3/5  loss 22.0000  loss_a 2.0000  loss_b 20.0000  lr 0.02  ")
    # The first iteration's time is left out (start-up costs): median of 0.5 and 0.7.
    assert "0.600 s/it (data 0.100)" in first
    assert "eta 0:00:01" in first  # 2 iterations left at 0.6 s
    assert "mem " in first and "(rss)" in first
    assert "grad_norm" not in first and "skipped" not in first
    # Medians over the last 3 (the window is the period): losses of iterations 3, 4, 5.
    assert last.startswith("iter 5/5  loss 44.0000  loss_a 4.0000  loss_b 40.0000  ")
    assert "eta 0:00:00" in last and last == hook.last_line
    assert [step for step, _ in writer.calls] == [3, 5]
    scalars = writer.calls[0][1]
    assert scalars["loss/loss"] == 22.0 and scalars["loss/loss_a"] == 2.0 and scalars["loss/loss_b"] == 20.0
    assert scalars["lr"] == 0.02 and scalars["time/iter"] == pytest.approx(0.6)
    assert scalars["time/data"] == pytest.approx(0.1) and scalars["memory_mb"] > 0
    assert writer.closed  # LogHook.close closes its writer


def test_log_hook_leaves_skipped_steps_out_of_the_medians_and_reports_grad_norm_and_skips():
    logger, out = _logger("test.hooks.skipped")
    hook = LogHook(period=2, logger=logger, show_bar=False)
    steps = [_step(1.0, 1.0), _step(float("nan"), 1.0, step_skipped=True, skipped_steps=1, grad_norm=None),
             _step(3.0, 3.0, step_skipped=False, grad_norm=2.5), _step(5.0, 5.0, grad_norm=1.25)]
    _drive([hook], _FakeTrainer(max_iter=4), steps)
    first, second = out.lines
    assert "loss 2.0000" in first and "nan" not in first and "skipped 1" in first
    assert "loss 8.0000" in second and "grad_norm 1.250" in second and "skipped 1" in second


def test_log_hook_resumed_run_and_progress_bar():
    logger, out = _logger("test.hooks.resume")
    hook = LogHook(period=2, logger=logger, show_bar=True)
    t = _FakeTrainer(max_iter=4, start_iter=2)
    _drive([hook], t, [_step(1.0, 1.0, time=9.0), _step(1.0, 1.0, time=0.25)])
    assert out.lines == [hook.last_line]
    assert out.lines[0].startswith("[####################]  iter 4/4  ")
    assert "0.250 s/it" in out.lines[0]  # iteration 2 is the resumed run's first: its time is left out


def test_log_hook_first_line_before_any_timed_iteration_uses_the_step_time():
    logger, out = _logger("test.hooks.first")
    hook = LogHook(period=1, logger=logger, show_bar=False)
    _drive([hook], _FakeTrainer(max_iter=1), [_step(1.0, 2.0, time=1.5, data=0.5)])
    assert "1.500 s/it (data 0.500)" in out.lines[0]


@pytest.mark.parametrize("period", [0, -3])
def test_hooks_reject_a_period_below_one(period):
    with pytest.raises(ValueError, match=f"LogHook: period must be >= 1, got {period}"):
        LogHook(period=period)
    with pytest.raises(ValueError, match=f"PeriodicCheckpointer: period must be >= 1, got {period}"):
        PeriodicCheckpointer(object(), period=period)


# --- PeriodicCheckpointer -----------------------------------------------------------------------------------------
class _RecordingCheckpointer:
    def __init__(self):
        self.saves = []

    def save(self, name, iteration, cfg_yaml=None):
        self.saves.append((name, iteration, cfg_yaml))
        return f"/ckpt/{name}.pth"


@pytest.mark.parametrize("period,max_iter,start_iter,expected", [
    (3, 7, 0, [("model_0000003", 3), ("model_0000006", 6)]),
    (2, 4, 0, [("model_0000002", 2)]),  # no periodic file at the last iteration: model_final is that one
    (5, 3, 0, []),
    (2, 6, 3, [("model_0000004", 4)]),  # resumed at 3: iterations done count from the start of training
])
def test_periodic_checkpoints_and_final(period, max_iter, start_iter, expected):
    ck = _RecordingCheckpointer()
    saver = PeriodicCheckpointer(ck, period=period, cfg_yaml="A: 1\n")
    _drive([saver], _FakeTrainer(max_iter=max_iter, start_iter=start_iter), [{}] * (max_iter - start_iter))
    assert ck.saves == [(n, i, "A: 1\n") for n, i in expected] + [("model_final", max_iter, "A: 1\n")]
    assert saver.final_path == "/ckpt/model_final.pth"


def test_periodic_checkpointer_stores_its_extra_entries_in_every_checkpoint():
    saves = []
    ck = type("Ck", (), {"save": lambda self, name, iteration, cfg_yaml=None, **extra: saves.append((name, extra))})()
    saver = PeriodicCheckpointer(ck, period=2, extra={"classes": ["__background__", "person"]})
    _drive([saver], _FakeTrainer(max_iter=3, start_iter=0), [{}] * 3)
    assert saves == [(n, {"classes": ["__background__", "person"]}) for n in ("model_0000002", "model_final")]


# --- TensorboardWriter --------------------------------------------------------------------------------------------
def test_tensorboard_writer_writes_each_scalar_then_flushes(monkeypatch):
    events = []

    class SummaryWriter:
        def __init__(self, log_dir):
            events.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            events.append(("scalar", tag, value, step))

        def flush(self):
            events.append(("flush",))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    w = TensorboardWriter("/tmp/tb")
    w.add_scalars({"loss/loss": 1.5, "lr": 0.01}, 7)
    w.close()
    assert w.log_dir == "/tmp/tb"
    assert events == [("open", "/tmp/tb"), ("scalar", "loss/loss", 1.5, 7), ("scalar", "lr", 0.01, 7), ("flush",),
                      ("close",)]


# --- the order the Trainer calls hooks in -------------------------------------------------------------------------
class _LinearDetector(nn.Module):
    def __init__(self, fail_at: Optional[int] = None):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.fail_at, self.calls = fail_at, 0

    def forward(self, images, targets):
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        self.calls += 1
        return {"loss_a": (self.w * torch.stack([im.mean() for im in images]).mean()) ** 2}


def _batches():
    while True:
        yield [torch.ones(3, 4, 4)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


class _Recorder(HookBase):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def before_train(self):
        self.log.append((self.name, "before_train"))

    def before_step(self):
        self.log.append((self.name, "before_step", self.trainer.iter))

    def after_step(self):
        self.log.append((self.name, "after_step", self.trainer.iter))

    def after_train(self):
        self.log.append((self.name, "after_train"))

    def close(self):
        self.log.append((self.name, "close"))


def _trainer(model, hooks, max_iter, start_iter=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    return Trainer(model, opt, sched, _batches(), max_iter=max_iter, start_iter=start_iter, hooks=hooks)


def test_trainer_calls_hooks_in_registration_order():
    log = []
    t = _trainer(_LinearDetector(), [_Recorder("a", log), None, _Recorder("b", log)], max_iter=3, start_iter=1)
    assert all(h.trainer is t for h in t.hooks) and len(t.hooks) == 2  # None entries are dropped
    t.train()
    expected = [("a", "before_train"), ("b", "before_train")]
    for it in (1, 2):
        expected += [("a", "before_step", it), ("b", "before_step", it), ("a", "after_step", it),
                     ("b", "after_step", it)]
    expected += [("a", "after_train"), ("b", "after_train"), ("a", "close"), ("b", "close")]
    assert log == expected


def test_after_an_exception_hooks_are_closed_but_after_train_is_not_called():
    log = []
    t = _trainer(_LinearDetector(fail_at=1), [_Recorder("a", log)], max_iter=3)
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    assert log == [("a", "before_train"), ("a", "before_step", 0), ("a", "after_step", 0), ("a", "before_step", 1),
                   ("a", "close")]


def test_hook_base_methods_do_nothing():
    h = HookBase()
    assert h.trainer is None
    for name in ("before_train", "before_step", "after_step", "after_train", "close"):
        assert getattr(h, name)() is None
