"""maskrcnn.engine.progress on its own: the training progress bar on a (fake) terminal, its ETA, how it gives way to
log lines, and silence off a terminal."""
import io
import logging

import pytest

from maskrcnn.engine.progress import TrainingProgress
from maskrcnn.utils import logger as logger_mod


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(logger_mod.time, "perf_counter", c)
    return c


class _FakeTrainer:
    def __init__(self, max_iter, start_iter=0):
        self.max_iter, self.start_iter, self.iter = max_iter, start_iter, start_iter


@pytest.fixture
def console(request):
    """A ``maskrcnn.test.<name>`` logger whose console handler writes to the same fake terminal as the bar."""
    name = f"maskrcnn.test.progress.{request.node.name}"
    lg = logging.getLogger(name)
    lg.handlers.clear()
    lg.propagate = False
    lg.setLevel(logging.INFO)
    tty = _Tty()
    handler = logging.StreamHandler(tty)
    lg.addHandler(handler)
    yield name, lg, tty, handler
    lg.handlers.clear()


def _screen(text: str) -> list:
    """What a terminal shows: each ``\\r`` returns to the start of the line, later characters overwrite."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    if cur:
        lines.append("".join(cur).rstrip())
    return lines


def test_bar_counts_iterations_with_rate_and_eta_and_gives_way_to_log_lines(clock, console):
    name, lg, tty, handler = console
    bar = TrainingProgress(stream=tty, enabled=True, logger_name=name)
    bar.trainer = _FakeTrainer(max_iter=10)
    bar.before_train()
    for it in range(4):
        clock.now += 0.5  # 2 it/s
        bar.after_step()
    assert _screen(tty.getvalue()) == ["train  [########............] 4/10  2.00 it/s eta 0:00:03  elapsed 0:00:02"]
    lg.info("iter 4/10  loss 1.0000")  # a log line erases the bar first, then the next step draws it below
    clock.now += 0.5
    bar.after_step()
    assert _screen(tty.getvalue()) == [
        "iter 4/10  loss 1.0000", "train  [##########..........] 5/10  2.00 it/s eta 0:00:02  elapsed 0:00:02"]
    for it in range(5):
        clock.now += 0.5
        bar.after_step()
    bar.after_train()
    bar.close()
    assert _screen(tty.getvalue())[-1].startswith("train  [####################] 10/10  2.00 it/s eta 0:00:00")
    assert tty.getvalue().endswith("\n") and not handler.filters  # the final line stays; the filter is removed


def test_a_resumed_run_starts_the_bar_at_its_first_iteration_and_measures_only_its_own_steps(clock):
    tty = _Tty()
    bar = TrainingProgress(stream=tty, enabled=True, logger_name="maskrcnn.test.progress.none")
    bar.trainer = _FakeTrainer(max_iter=100, start_iter=60)
    bar.before_train()
    for it in range(10):
        clock.now += 0.25
        bar.after_step()
    assert _screen(tty.getvalue()) == ["train  [##############......] 70/100  4.00 it/s eta 0:00:07  elapsed 0:00:02"]


def test_off_a_terminal_or_when_disabled_nothing_is_drawn(clock):
    for stream, enabled in [(io.StringIO(), None), (_Tty(), False)]:
        bar = TrainingProgress(stream=stream, enabled=enabled)
        bar.trainer = _FakeTrainer(max_iter=3)
        bar.before_train()
        for it in range(3):
            clock.now += 1.0
            bar.after_step()
        bar.after_train()
        bar.close()
        assert stream.getvalue() == "" and not bar.enabled


def test_an_error_mid_run_leaves_a_clean_line_for_the_traceback(clock):
    tty = _Tty()
    bar = TrainingProgress(stream=tty, enabled=True, logger_name="maskrcnn.test.progress.none")
    bar.trainer = _FakeTrainer(max_iter=5)
    bar.before_train()
    clock.now += 1.0
    bar.after_step()
    bar.close()  # the trainer closes hooks after an exception without calling after_train
    assert _screen(tty.getvalue()) == [""] and tty.getvalue().endswith("\r")
