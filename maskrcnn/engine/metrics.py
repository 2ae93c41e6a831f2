"""``metrics.jsonl``: the machine-readable record of a training run, mirrored to TensorBoard.

One json object per line, appended as the run goes:

- ``{"type": "train", "iteration": N, "total_loss", "loss_cls", ... (every loss), "lr", "time", "data_time",
  "memory_mb", "peak_memory_mb", "grad_norm"}`` every ``TRAIN.LOG_PERIOD`` iterations and at the last one
  (:class:`~maskrcnn.engine.hooks.LogHook`). ``N`` counts the iterations done (1-based, as the log line's
  ``iter N/MAX``); losses, ``time`` and ``data_time`` are the medians over the period averaged over processes (the
  log line's values), ``lr`` the schedule's lr of the last step, ``grad_norm`` the last step's total gradient norm
  (before clipping), ``memory_mb`` what the log line shows (CUDA: peak allocated; CPU: resident set),
  ``peak_memory_mb`` the process's peak (CUDA: peak allocated; CPU: peak resident set).
- ``{"type": "eval", "iteration": N, "bbox/AP", "bbox/AP50", ..., "bbox/AR100", ..., "bbox/AP-<class>", "segm/...",
  "eval_time"}`` after each evaluation (``TEST.EVAL_PERIOD``; :mod:`maskrcnn.engine.evaluation_hook`). With several
  ``TEST.DATASETS`` the keys carry the dataset first: ``"coco_2017_val/bbox/AP"``.

NaN and infinities are written as ``null``. Only rank 0 writes. A run resumed from the checkpoint of iteration ``K``
first drops the records past ``K`` (and a line cut by a kill), so that after any number of interruptions the file
holds every logged iteration exactly once: the hooks write a record before the checkpoint of the same iteration
(hook order in ``train_net``), so a record at ``N <= K`` was always written before checkpoint ``K`` existed.

TensorBoard gets the same values (:func:`scalar_tags` names them: ``loss/<name>``, ``lr``, ``time/iter``,
``time/data``, ``memory/mb``, ``memory/peak_mb``, ``grad_norm``; evaluation keys as they are, ``bbox/AP``), with
the resumed run purging the steps past ``K`` from its view.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..utils.checkpoint import atomic_write
from ..utils.env import memory_mb

__all__ = ["METRICS_FILE", "MetricsWriter", "read_metrics", "truncate_metrics", "scalar_tags", "peak_memory_mb",
           "train_record"]

logger = logging.getLogger("maskrcnn.metrics")

METRICS_FILE = "metrics.jsonl"

# Training-record key -> TensorBoard tag (losses are "loss/<key>"; evaluation keys are tags already).
_TRAIN_TAGS = {"lr": "lr", "time": "time/iter", "data_time": "time/data", "memory_mb": "memory/mb",
               "peak_memory_mb": "memory/peak_mb", "grad_norm": "grad_norm", "skipped_steps": "skipped_steps",
               "eval_time": "time/eval"}
_NOT_SCALARS = ("type", "iteration")


def peak_memory_mb(device: Any = None) -> float:
    """Peak memory of this process in MiB: PyTorch's peak allocated on a CUDA ``device``, else the peak resident
    set size (``getrusage``: KiB on Linux, bytes on macOS; never below the current one, which the kernel counts
    slightly differently)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024, memory_mb(None))


def train_record(done: int, values: Mapping[str, float], trainer: Any, memory_mb: float) -> Dict[str, Any]:
    """The ``"train"`` record of a log line: ``values`` holds the line's (process-averaged) medians, ``"loss"`` the
    total and ``"time"``/``"data_time"``; the lr, grad norm and skip count come from ``trainer``."""
    rec: Dict[str, Any] = {"type": "train", "iteration": int(done)}
    if "loss" in values:
        rec["total_loss"] = float(values["loss"])
    rec.update({k: float(v) for k, v in sorted(values.items()) if k not in ("loss", "time", "data_time")})
    rec.update({"lr": float(trainer.lr), "time": float(values["time"]), "data_time": float(values["data_time"]),
                "memory_mb": float(memory_mb),
                "peak_memory_mb": max(peak_memory_mb(trainer.device), float(memory_mb)),
                "grad_norm": None if trainer.grad_norm is None else float(trainer.grad_norm)})
    if getattr(trainer, "skipped_steps", 0):
        rec["skipped_steps"] = int(trainer.skipped_steps)
    return rec


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def _parse(path: str):
    """``(records, clean)``: the records of the complete, readable lines; ``clean`` is False when a line was cut
    (the last one, by a kill) or unreadable."""
    records: List[Dict[str, Any]] = []
    clean = True
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                clean = False  # cut by an interruption
                break
            try:
                rec = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                clean = False
                continue
            if isinstance(rec, dict) and "iteration" in rec:
                records.append(rec)
            else:
                clean = False
    return records, clean


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``path`` is the file or the run's output folder), in file order; a last
    line cut by an interruption is left out. Raises ``FileNotFoundError`` naming the path."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file {path}: maskrcnn-train writes OUTPUT_DIR/{METRICS_FILE} as it trains")
    return _parse(path)[0]


def truncate_metrics(path: str, last_iteration: int) -> List[Dict[str, Any]]:
    """Keep the records of ``path`` up to ``last_iteration`` (included) and drop the rest, a cut or unreadable
    line included; the file is rewritten atomically only when something is dropped. Returns the kept records
    (``[]`` when the file does not exist)."""
    if not os.path.isfile(path):
        return []
    records, clean = _parse(path)
    kept = [r for r in records if int(r["iteration"]) <= int(last_iteration)]
    if len(kept) != len(records) or not clean:
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")), what="metrics file")
        logger.info("%s: kept %d records up to iteration %d, dropped %d written after it%s", path, len(kept),
                    last_iteration, len(records) - len(kept), "" if clean else " and an incomplete line")
    return kept


def scalar_tags(record: Mapping[str, Any]) -> Dict[str, float]:
    """TensorBoard tag -> value for the numbers of a record (``None`` values and non-numbers left out)."""
    out: Dict[str, float] = {}
    for k, v in record.items():
        if k in _NOT_SCALARS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            continue
        if k in _TRAIN_TAGS:
            tag = _TRAIN_TAGS[k]
        elif k.startswith("loss") or k == "total_loss":
            tag = f"loss/{k}"
        else:
            tag = k  # evaluation metrics: "bbox/AP", "segm/AP-rectangle", "coco_2017_val/bbox/AP"
        out[tag] = v
    return out


class MetricsWriter:
    """Appends records to ``output_dir/metrics.jsonl`` and sends their numbers to TensorBoard (rank 0 only).

    Args:
        output_dir: the run's folder.
        start_iter: the iteration the run starts from (0, or the resumed checkpoint's): records past it are dropped
            from an existing file first (:func:`truncate_metrics`).
        tb_writer: optional :class:`~maskrcnn.engine.hooks.TensorboardWriter` (created with ``purge_step =
            start_iter + 1`` when resuming, so TensorBoard drops the same steps).

    Attributes:
        path: the file.
        previous: the records kept from before ``start_iter`` (e.g. to find the best evaluation so far).
    """

    def __init__(self, output_dir: str, start_iter: int = 0, tb_writer=None):
        self.path = os.path.join(os.fspath(output_dir), METRICS_FILE)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.previous = truncate_metrics(self.path, int(start_iter))
        self.tb_writer = tb_writer
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (must hold ``iteration``) as one line, flushed, and its numbers to TensorBoard."""
        if "iteration" not in record:
            raise ValueError(f"MetricsWriter.write: a record needs an 'iteration', got keys {sorted(record)}")
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        if self.tb_writer is not None:
            self.tb_writer.add_scalars(scalar_tags(clean), int(record["iteration"]))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
