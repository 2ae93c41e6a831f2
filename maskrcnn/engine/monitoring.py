"""What a user watches during a training run, wired from the config for ``maskrcnn-train``:

- ``OUTPUT_DIR/metrics.jsonl`` (:mod:`maskrcnn.engine.metrics`), and TensorBoard scalars of the same values in
  ``OUTPUT_DIR/tb`` (``--use_tfboard``), both cut back to the resumed iteration on ``--resume``;
- evaluations every ``TEST.EVAL_PERIOD`` iterations and at the end, and ``model_best.pth`` by
  ``SOLVER.CHECKPOINT_BEST`` (:mod:`maskrcnn.engine.evaluation_hook`), made to agree with the kept records on
  ``--resume`` (:meth:`~maskrcnn.engine.evaluation_hook.BestCheckpointer.reconcile`);
- the live progress bar on a terminal (:mod:`maskrcnn.engine.progress`).

Hook order matters for resuming: train_net registers ``LogHook`` (train record), the :class:`EvalHook` (eval
record, best checkpoint), then the periodic checkpointer, then the progress bar; so every record of iteration
``N`` is on disk before the checkpoint of ``N`` is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

from .evaluation_hook import BestCheckpointer, EvalHook, coco_evaluator
from .metrics import MetricsWriter
from .progress import TrainingProgress

__all__ = ["TrainingMonitors", "build_training_monitors"]


@dataclass
class TrainingMonitors:
    """``metrics``: rank 0's writer (None elsewhere), for ``LogHook(metrics_writer=...)``; ``eval_hook``: None
    when ``TEST.EVAL_PERIOD`` is 0; ``progress``: the terminal bar (register it last)."""

    metrics: Optional[MetricsWriter]
    eval_hook: Optional[EvalHook]
    progress: TrainingProgress


def build_training_monitors(cfg, *, model, eval_datasets: Sequence[Tuple[str, Any]], device: Any, is_main: bool,
                            start_iter: int, use_tensorboard: bool = False, best_metric: str = "",
                            cfg_yaml: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None,
                            logger: Optional[logging.Logger] = None) -> TrainingMonitors:
    """Build the monitors of a run in ``cfg.OUTPUT_DIR`` starting at ``start_iter``.

    Args:
        model: the model being trained (unwrapped or DDP); evaluations run on a copy.
        eval_datasets: ``(spec, dataset)`` of ``TEST.DATASETS`` (used when ``TEST.EVAL_PERIOD`` > 0).
        is_main: rank 0 writes the files.
        use_tensorboard: ``--use_tfboard``: TensorBoard scalars in ``OUTPUT_DIR/tb`` (raises
            :class:`~maskrcnn.engine.hooks.TensorboardUnavailable` when the package is missing).
        best_metric: the flattened metric key of ``SOLVER.CHECKPOINT_BEST`` (``check_best_metric``), '' for none.
        cfg_yaml, extra: stored in ``model_best.pth``.
    """
    from .hooks import TensorboardWriter

    logger = logger or logging.getLogger("maskrcnn.train")
    output_dir = cfg.OUTPUT_DIR
    metrics = None
    if is_main:
        tb = None
        if use_tensorboard:
            # A resumed run hides the TensorBoard events past its checkpoint, as metrics.jsonl drops them.
            tb = TensorboardWriter(os.path.join(output_dir, "tb"), purge_step=start_iter + 1 if start_iter else None)
        metrics = MetricsWriter(output_dir, start_iter=start_iter, tb_writer=tb)
    eval_hook = None
    period = int(cfg.TEST.EVAL_PERIOD)
    if period > 0:
        best = None
        if best_metric:
            best = BestCheckpointer(output_dir, model, best_metric, cfg_yaml=cfg_yaml, extra=extra,
                                    save_to_disk=is_main, previous=metrics.previous if metrics is not None else (),
                                    logger=logger)
            best.reconcile(start_iter)  # a model_best.pth of dropped evaluations (or of another run) goes
        evaluate = coco_evaluator(model, eval_datasets, cfg, device=device,
                                  num_workers=int(cfg.DATA_LOADER.NUM_THREADS), log=logger.info)
        eval_hook = EvalHook(period, evaluate, metrics_writer=metrics, best=best, logger=logger)
    return TrainingMonitors(metrics=metrics, eval_hook=eval_hook, progress=TrainingProgress())
