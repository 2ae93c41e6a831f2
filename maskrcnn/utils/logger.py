"""Logging setup, windowed metric smoothing and a progress display that suits both terminals and log files."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections import deque
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

__all__ = ["setup_logger", "SmoothedValue", "format_seconds", "progress_bar", "Progress"]

_FORMAT = "[%(asctime)s %(name)s] %(message)s"
_DATEFMT = "%m/%d %H:%M:%S"

T = TypeVar("T")


def setup_logger(name: str = "maskrcnn", output_dir: Optional[str] = None, rank: int = 0,
                 level: int = logging.INFO, stream: Optional[TextIO] = None) -> logging.Logger:
    """Configure logger ``name``: the console on rank 0 only, and ``output_dir/log.txt`` (``log.txt.rank<r>``
    for other ranks) when ``output_dir`` is given. Calling it again replaces the handlers it added before."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_maskrcnn_handler", False):
            logger.removeHandler(h)
            h.close()
    formatter = logging.Formatter(_FORMAT, datefmt=_DATEFMT)
    if rank == 0:
        console = logging.StreamHandler(stream if stream is not None else sys.stdout)
        console.setFormatter(formatter)
        console._maskrcnn_handler = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        filename = os.path.join(output_dir, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
        fh = logging.FileHandler(filename, mode="a", encoding="utf-8")
        fh.setFormatter(formatter)
        fh._maskrcnn_handler = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    return logger


class SmoothedValue:
    """A series of floats with its median and mean over the last ``window`` values (Detectron logs medians:
    one odd iteration does not dominate the line) and its global mean."""

    def __init__(self, window: int = 20):
        if int(window) < 1:
            raise ValueError(f"SmoothedValue: window must be >= 1, got {window!r}")
        self.values: deque = deque(maxlen=int(window))
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        value = float(value)
        self.values.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        n = len(ordered)
        mid = n // 2
        return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    @property
    def avg(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def latest(self) -> float:
        return self.values[-1] if self.values else float("nan")


def format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (days are spelled out by ``datetime.timedelta``)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def progress_bar(fraction: float, width: int = 20) -> str:
    """``[#####.....]`` for ``fraction`` in [0, 1]."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """Wraps an iterable and reports progress: a single redrawn line on a terminal, or a plain line every
    ``log_every`` seconds (and at the end) when the stream is a file or a pipe, so logs stay readable.

    Args:
        iterable: what to iterate.
        total: number of items (``len(iterable)`` when omitted and available).
        desc: label at the start of each line.
        stream: where to write (default ``sys.stderr``); ``None`` output is silenced with ``enabled=False``.
        log_every: seconds between plain lines (non-terminal streams).
        enabled: write nothing when False (e.g. on ranks other than 0).
        unit: what one item is called in the line ("img", "it").
        initial: items already done before this run (a resumed pass); they count towards ``total`` but not
            towards the rate.

    Iterating counts one item per element; loops that do their own counting call :meth:`start`, :meth:`advance`
    and :meth:`close` instead.
    """

    def __init__(self, iterable: Iterable[T], total: Optional[int] = None, desc: str = "",
                 stream: Optional[TextIO] = None, log_every: float = 30.0, enabled: bool = True, unit: str = "it",
                 initial: int = 0):
        self.iterable = iterable
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.log_every = float(log_every)
        self.enabled = bool(enabled)
        self.unit = unit
        self.count = int(initial)
        self._initial = int(initial)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._written_count: Optional[int] = None  # count of the last plain line written
        self._drawn = 0  # characters of the redrawn terminal line now on screen (0: none)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done (for loops that do not iterate this object)."""
        self.count += int(n)
        self._maybe_report()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._start
        done = self.count - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{progress_bar(self.count / self.total)} {self.count}/{self.total}")
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            parts.append(f"{rate:.2f} {self.unit}/s eta {format_seconds(eta)}")
        else:
            parts.append(f"{self.count} {self.unit} {rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        return "  ".join(parts)

    def _maybe_report(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            # Redrawing more than ~10 times a second only costs time.
            if final or now - self._last >= 0.1:
                line = self._line()
                # Padded over a longer previous line, so that no stale characters remain.
                self.stream.write("\r" + line.ljust(self._drawn) + ("\n" if final else ""))
                self.stream.flush()
                self._last = now
                self._drawn = 0 if final else len(line)
        elif (self.count != self._written_count) if final else (now - self._last >= self.log_every):
            # The final line is skipped when the last item's periodic line already said the same.
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self._last = now
            self._written_count = self.count

    def __iter__(self) -> Iterator[T]:
        self._start = self._last = time.perf_counter()
        for item in self.iterable:
            yield item
            self.advance(1)
        self._maybe_report(final=True)

    def start(self) -> "Progress":
        """Start the clock for use with :meth:`advance` (instead of iterating)."""
        self._start = self._last = time.perf_counter()
        return self

    def close(self) -> None:
        """Write the final line (when using :meth:`advance`)."""
        self._maybe_report(final=True)

    def clear(self) -> None:
        """Erase the redrawn terminal line, so that other output (a log line) starts on a clean line; the next
        :meth:`advance` draws it again. Nothing to do on a non-terminal stream."""
        if self.enabled and self._tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
            self._last = float("-inf")
