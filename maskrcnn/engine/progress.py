"""A live progress bar with ETA for training, on a terminal: the inference loop's
:class:`~maskrcnn.utils.logger.Progress` counting iterations, redrawn after every iteration (at most 10 times a
second) between the log lines.

    train  [#######.............] 350/1000  2.51 it/s eta 0:04:19  elapsed 0:02:19

The bar lives on one terminal line; a logging filter on the console handlers of the ``maskrcnn`` logger erases it
before any log line is printed (the periodic line, an evaluation table, a checkpoint message) and the next
iteration draws it again below, so the log stays readable. The ETA is measured over the whole resumed run, so it
includes the time spent evaluating and checkpointing. When the stream is not a terminal (a log file, a pipe, a
batch job) nothing is drawn: the periodic ``TRAIN.LOG_PERIOD`` lines carry the ETA there.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional, TextIO, Tuple

from ..utils import distributed as dist_utils
from ..utils.logger import Progress
from .hooks import HookBase

__all__ = ["TrainingProgress"]


class _ClearBeforeRecord(logging.Filter):
    """Handler filter: erases the progress bar before a record is printed (lets every record through)."""

    def __init__(self, bar: Progress):
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        self.bar.clear()
        return True


class TrainingProgress(HookBase):
    """Training progress bar (rank 0, terminal only).

    Args:
        stream: where the bar goes (default ``sys.stderr``).
        enabled: draw it (default: on rank 0 when ``stream`` is a terminal).
        logger_name: the logger whose console handlers erase the bar before each line (``setup_logger``'s).
    """

    def __init__(self, stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
                 logger_name: str = "maskrcnn"):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = dist_utils.is_main_process() and bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = bool(enabled)
        self.logger_name = logger_name
        self.bar: Optional[Progress] = None
        self._filtered: List[Tuple[logging.Handler, logging.Filter]] = []

    def before_train(self) -> None:
        t = self.trainer
        self.bar = Progress(None, total=t.max_iter, desc="train", unit="it", stream=self.stream,
                            enabled=self.enabled, initial=t.start_iter).start()
        if not self.enabled:
            return
        filt = _ClearBeforeRecord(self.bar)
        for h in logging.getLogger(self.logger_name).handlers:
            # Console handlers only: a log file never shows the bar.
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.addFilter(filt)
                self._filtered.append((h, filt))

    def after_step(self) -> None:
        if self.bar is not None:
            self.bar.total = self.trainer.max_iter  # an --auto budget may move the end (engine/budget.py)
            self.bar.advance(1)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.clear()
            self.bar.close()  # the final line stays on screen

    def close(self) -> None:
        for h, filt in self._filtered:
            h.removeFilter(filt)
        self._filtered = []
        if self.bar is not None:
            self.bar.clear()  # after an error: the traceback starts on a clean line
