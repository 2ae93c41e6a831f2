"""maskrcnn.utils.logger on its own: handler setup and line format, smoothing, time/bar formatting, Progress."""
import io
import logging
import re

import pytest

from maskrcnn.utils import logger as logger_mod
from maskrcnn.utils.logger import Progress, SmoothedValue, format_seconds, progress_bar, setup_logger

LINE_RE = re.compile(r"^\[\d\d/\d\d \d\d:\d\d:\d\d (?P<name>[\w.]+)\] (?P<msg>.*)$")


@pytest.fixture
def fresh_logger(request):
    name = f"maskrcnn.test.{request.node.name}"
    yield name
    lg = logging.getLogger(name)
    for h in list(lg.handlers):
        h.close()
        lg.removeHandler(h)


class _Tty(io.StringIO):
    def isatty(self):
        return True


# --- setup_logger -------------------------------------------------------------------------------------------------
def test_rank0_line_format_on_console_and_in_log_txt(tmp_path, fresh_logger):
    out = io.StringIO()
    lg = setup_logger(fresh_logger, str(tmp_path / "run"), rank=0, stream=out)
    lg.info("iter 1/2  loss 0.5")
    lg.debug("not shown at INFO")
    console = out.getvalue().splitlines()
    assert len(console) == 1
    m = LINE_RE.match(console[0])
    assert m and m.group("name") == fresh_logger and m.group("msg") == "iter 1/2  loss 0.5"
    assert (tmp_path / "run" / "log.txt").read_text(encoding="utf-8").splitlines() == console
    assert lg.propagate is False and lg.level == logging.INFO


def test_other_ranks_write_only_their_own_file(tmp_path, fresh_logger):
    out = io.StringIO()
    lg = setup_logger(fresh_logger, str(tmp_path), rank=3, stream=out)
    lg.warning("from rank 3")
    assert out.getvalue() == ""
    assert not (tmp_path / "log.txt").exists()
    assert LINE_RE.match((tmp_path / "log.txt.rank3").read_text().strip()).group("msg") == "from rank 3"
    # A rank other than 0 without an output directory logs nowhere.
    lg = setup_logger(fresh_logger, None, rank=1, stream=out)
    lg.error("lost")
    assert out.getvalue() == "" and lg.handlers == []


def test_setting_up_again_replaces_own_handlers_keeps_others_and_appends_to_the_file(tmp_path, fresh_logger):
    foreign = logging.NullHandler()
    logging.getLogger(fresh_logger).addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    setup_logger(fresh_logger, str(tmp_path), stream=first).info("one")
    lg = setup_logger(fresh_logger, str(tmp_path), stream=second, level=logging.DEBUG)
    lg.debug("two")
    assert "one" in first.getvalue() and "two" not in first.getvalue()
    assert second.getvalue().count("two") == 1
    assert foreign in lg.handlers and len(lg.handlers) == 3  # foreign + console + file
    msgs = [LINE_RE.match(line).group("msg") for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert msgs == ["one", "two"]  # the file is appended to, not truncated


def test_unicode_messages_reach_the_file(tmp_path, fresh_logger):
    setup_logger(fresh_logger, str(tmp_path), stream=io.StringIO()).info("größe 5 µm")
    assert "größe 5 µm" in (tmp_path / "log.txt").read_text(encoding="utf-8")


# --- SmoothedValue ------------------------------------------------------------------------------------------------
def test_smoothed_value_window_statistics():
    v = SmoothedValue(window=4)
    nan = [v.median, v.avg, v.global_avg, v.latest]
    assert all(x != x for x in nan)  # NaN before any value
    for x in (10, 1, 4, 2, 8):
        v.update(x)
    assert list(v.values) == [1.0, 4.0, 2.0, 8.0]  # the first value left the window
    assert v.median == 3.0  # even count: mean of the middle two
    assert v.avg == 3.75 and v.latest == 8.0
    assert v.count == 5 and v.global_avg == 5.0  # over every value ever seen
    v.update(3)
    assert v.median == 3.5 and list(v.values) == [4.0, 2.0, 8.0, 3.0]


def test_smoothed_value_rejects_an_empty_window():
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        SmoothedValue(0)


# --- format_seconds / progress_bar --------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds,text", [
    (0, "0:00:00"), (59.9, "0:00:59"), (3725, "1:02:05"), (-5, "0:00:00"), (86400 + 61, "1 day, 0:01:01"),
    (float("nan"), "?"), (float("inf"), "?"), (float("-inf"), "?"),
])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


@pytest.mark.parametrize("fraction,width,bar", [
    (0.0, 4, "[....]"), (0.5, 4, "[##..]"), (1.0, 4, "[####]"), (1.7, 4, "[####]"), (-1, 4, "[....]"),
    (0.34, 10, "[###.......]"), (0.36, 10, "[####......]"),
])
def test_progress_bar(fraction, width, bar):
    assert progress_bar(fraction, width) == bar
    assert len(progress_bar(fraction)) == 22  # default width 20 plus brackets


# --- Progress -----------------------------------------------------------------------------------------------------
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


def test_progress_lines_in_a_file_every_log_every_seconds_and_at_the_end(clock):
    out = io.StringIO()
    p = Progress(range(4), desc="eval", stream=out, log_every=10, unit="img")
    for i in p:
        clock.now += 6.0  # reported after items 2 and 4 (12 s and 24 s after the start)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [  # the final line would repeat item 4's: written once
        "eval  [##########..........] 2/4  0.17 img/s eta 0:00:12  elapsed 0:00:12",
        "eval  [####################] 4/4  0.17 img/s eta 0:00:00  elapsed 0:00:24",
    ]
    out = io.StringIO()
    for _ in Progress(range(3), desc="eval", stream=out, log_every=10):
        clock.now += 6.0  # a line after item 2; the end (item 3, 6 s later) gets its own final line
    assert [line.split("  ")[1] for line in out.getvalue().splitlines()] == [
        "[#############.......] 2/3", "[####################] 3/3"]


def test_progress_with_log_every_zero_writes_one_line_per_item(clock):
    out = io.StringIO()
    for _ in Progress(range(3), stream=out, log_every=0):
        clock.now += 1.0
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == [
        "[#######.............] 1/3", "[#############.......] 2/3", "[####################] 3/3"]


def test_progress_redraws_one_line_on_a_terminal(clock):
    tty = _Tty()
    p = Progress(range(3), stream=tty)
    for _ in p:
        clock.now += 0.05  # faster than the 0.1 s redraw limit: only every other item is drawn
    text = tty.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert text.count("\r") == 2  # after item 2 (0.1 s) and the final line
    assert text.rstrip("\n").rsplit("\r", 1)[1].startswith("[####################] 3/3  20.00 it/s")


def test_progress_without_a_total_counts_items(clock):
    out = io.StringIO()
    items = (i for i in range(3))  # no len()
    p = Progress(items, stream=out, log_every=1000, unit="batch")
    assert p.total is None
    for _ in p:
        clock.now += 1.0
    assert out.getvalue() == "3 batch 1.00 batch/s  elapsed 0:00:03\n"


def test_progress_manual_counting_with_resumed_items(clock):
    out = io.StringIO()
    p = Progress(None, total=10, desc="train", stream=out, log_every=1000, initial=4).start()
    clock.now += 2.0
    p.advance(2)
    p.advance(2)
    p.close()
    # 4 items in 2 s (the 4 resumed ones do not count towards the rate), 2 left at 2 items/s.
    assert out.getvalue() == "train  [################....] 8/10  2.00 it/s eta 0:00:01  elapsed 0:00:02\n"


def test_disabled_progress_writes_nothing_but_still_counts(clock):
    out = io.StringIO()
    p = Progress([1, 2, 3], stream=out, enabled=False, log_every=0)
    assert list(p) == [1, 2, 3]
    assert p.count == 3 and out.getvalue() == ""


def test_progress_at_a_standstill_has_an_unknown_eta(clock):
    out = io.StringIO()
    p = Progress(None, total=5, stream=out).start()
    p.close()
    assert out.getvalue() == "[....................] 0/5  0.00 it/s eta ?  elapsed 0:00:00\n"
