"""Training hooks: periodic log lines, TensorBoard scalars, periodic and final checkpoints.

A hook's methods are called by :class:`~maskrcnn.engine.trainer.Trainer` on every process, in registration order:
``before_train``, then ``before_step``/``after_step`` per iteration (``trainer.iter`` is the iteration's index),
``after_train`` once all iterations have run, and ``close`` always (also after an exception).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Optional

from ..utils import distributed as dist_utils
from ..utils.env import memory_mb
from ..utils.logger import SmoothedValue, format_seconds, progress_bar
from .metrics import train_record

__all__ = ["HookBase", "LogHook", "TensorboardWriter", "TensorboardUnavailable", "PeriodicCheckpointer"]


class TensorboardUnavailable(RuntimeError):
    """TensorBoard logging was asked for but the ``tensorboard`` package is not installed."""


class HookBase:
    """No-op hook; ``self.trainer`` is set when the hook is registered."""

    trainer: Any = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorboardWriter:
    """Thin wrapper of ``torch.utils.tensorboard.SummaryWriter``, imported only when one is created.

    Raises :class:`TensorboardUnavailable` saying how to install TensorBoard when the package is missing (so
    ``--use_tfboard`` fails before training starts, not at the first log line).
    """

    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TensorboardUnavailable(f"--use_tfboard needs the 'tensorboard' package, which is not installed "
                               f"({e}); install it with `pip install tensorboard` or drop --use_tfboard") from None
        self.log_dir = log_dir
        # purge_step (a resumed run: its first iteration done): TensorBoard hides the older events at or past it.
        self._writer = (SummaryWriter(log_dir=log_dir) if purge_step is None
                        else SummaryWriter(log_dir=log_dir, purge_step=int(purge_step)))

    def add_scalars(self, values: Dict[str, float], step: int) -> None:
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class LogHook(HookBase):
    """Every ``period`` iterations (and at the last one): a line with each loss and the total (medians over the
    period, averaged over processes), the lr, seconds per iteration, ETA and memory; the same values go to
    ``tb_writer`` when given.

    Args:
        period: iterations between lines (cfg ``TRAIN.LOG_PERIOD``).
        logger: where lines go (only rank 0 writes TensorBoard scalars).
        tb_writer: optional :class:`TensorboardWriter` (rank 0).
        show_bar: prefix lines with a progress bar (default: when stdout is a terminal).
        metrics_writer: optional :class:`~maskrcnn.engine.metrics.MetricsWriter` (rank 0): each line's values also
            go to ``metrics.jsonl`` (and its TensorBoard writer) as a ``"train"`` record; closed with this hook.
    """

    def __init__(self, period: int = 20, logger: Optional[logging.Logger] = None,
                 tb_writer: Optional[TensorboardWriter] = None, show_bar: Optional[bool] = None,
                 metrics_writer=None):
        if int(period) < 1:
            raise ValueError(f"LogHook: period must be >= 1, got {period}")
        self.period = int(period)
        self.logger = logger or logging.getLogger("maskrcnn.train")
        self.tb_writer = tb_writer
        self.metrics_writer = metrics_writer
        self.show_bar = sys.stdout.isatty() if show_bar is None else bool(show_bar)
        self._series: Dict[str, SmoothedValue] = {}
        self._time = SmoothedValue(self.period)
        self._data_time = SmoothedValue(self.period)
        self.last_line = ""

    def _series_for(self, name: str) -> SmoothedValue:
        if name not in self._series:
            self._series[name] = SmoothedValue(self.period)
        return self._series[name]

    def after_step(self) -> None:
        t = self.trainer
        if t.iter > t.start_iter:  # the first iteration pays one-off start-up costs
            self._time.update(t.step_time)
            self._data_time.update(t.data_time)
        if not t.step_skipped:
            for k, v in t.losses.items():
                self._series_for(k).update(v)
            self._series_for("loss").update(t.total_loss)
        done = t.iter + 1
        if done % self.period == 0 or done == t.max_iter:
            self.write(done)

    def write(self, done: int) -> None:
        t = self.trainer
        names = sorted(self._series)
        local = {k: self._series[k].median for k in names}
        sec_per_iter = self._time.median if self._time.values else t.step_time
        local["time"] = sec_per_iter
        local["data_time"] = self._data_time.median if self._data_time.values else t.data_time
        # Collective: every rank reaches this line at the same iterations with the same keys.
        values = dist_utils.reduce_dict_mean(local)
        mem = memory_mb(t.device)
        eta = (t.max_iter - done) * values["time"]
        parts = []
        if self.show_bar:
            parts.append(progress_bar(done / t.max_iter))
        parts.append(f"iter {done}/{t.max_iter}")
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f}")
        parts.extend(f"{k} {values[k]:.4f}" for k in names if k != "loss")
        parts.append(f"lr {t.lr:.6g}")
        parts.append(f"{values['time']:.3f} s/it (data {values['data_time']:.3f})")
        parts.append(f"eta {format_seconds(eta)}")
        parts.append(f"mem {mem:.0f}M" + (" (max allocated)" if t.device.type == "cuda" else " (rss)"))
        if t.grad_norm is not None:
            parts.append(f"grad_norm {t.grad_norm:.3f}")
        if t.skipped_steps:
            parts.append(f"skipped {t.skipped_steps}")
        self.last_line = "  ".join(parts)
        self.logger.info(self.last_line)
        if self.tb_writer is not None and dist_utils.is_main_process():
            scalars = {f"loss/{k}": values[k] for k in names}
            scalars.update({"lr": t.lr, "time/iter": values["time"], "time/data": values["data_time"],
                            "memory_mb": mem})
            self.tb_writer.add_scalars(scalars, done)
        if self.metrics_writer is not None and dist_utils.is_main_process():
            self.metrics_writer.write(train_record(done, values, t, mem))

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
        if self.metrics_writer is not None:
            self.metrics_writer.close()


class PeriodicCheckpointer(HookBase):
    """Writes ``model_{iterations done:07d}.pth`` every ``period`` iterations and ``model_final.pth`` at the end.

    Args:
        checkpointer: a :class:`~maskrcnn.utils.checkpoint.Checkpointer` (its ``save`` runs on every rank).
        period: cfg ``TRAIN.SNAPSHOT_ITERS``.
        cfg_yaml: the run's config, stored in every checkpoint.
        extra: more entries stored in every checkpoint (train_net: the dataset's ``classes``, with which
            ``maskrcnn.Predictor`` names the labels).
    """

    def __init__(self, checkpointer, period: int, cfg_yaml: Optional[str] = None,
                 extra: Optional[Dict[str, Any]] = None):
        if int(period) < 1:
            raise ValueError(f"PeriodicCheckpointer: period must be >= 1, got {period}")
        self.checkpointer = checkpointer
        self.period = int(period)
        self.cfg_yaml = cfg_yaml
        self.extra = dict(extra or {})
        self.final_path: Optional[str] = None

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.period == 0 and done < self.trainer.max_iter:
            self.checkpointer.save(f"model_{done:07d}", iteration=done, cfg_yaml=self.cfg_yaml, **self.extra)

    def after_train(self) -> None:
        self.final_path = self.checkpointer.save("model_final", iteration=self.trainer.max_iter,
                                                 cfg_yaml=self.cfg_yaml, **self.extra)
