"""Evaluation during training (cfg ``TEST.EVAL_PERIOD``) and the best checkpoint (cfg ``SOLVER.CHECKPOINT_BEST``).

Every ``TEST.EVAL_PERIOD`` iterations and after the last one, :class:`EvalHook` runs the configured evaluation —
the COCO evaluation of ``maskrcnn-test``, on every ``TEST.DATASETS`` entry (:func:`coco_evaluator`) — on all
processes (each runs its shard of the images; rank 0 gathers and evaluates, then shares the numbers), logs the
box and mask AP, appends an ``"eval"`` record to ``metrics.jsonl`` (every AP and AR, per-category AP) and lets a
:class:`BestCheckpointer` keep ``model_best.pth``.

Evaluation leaves training untouched: it runs on a copy of the model prepared for inference (the ``TEST`` speed
features), and the global RNG states are restored afterwards, so a run with evaluations trains bit for bit like one
without. The copy costs one more model in memory while it runs.

Metric names are the flattened ``metrics.json`` keys: ``"bbox/AP"``, ``"segm/AP50"``, ``"bbox/AR100"``,
``"segm/AP-<class>"``; with several test datasets each is prefixed with the dataset: ``"coco_2017_val/bbox/AP"``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import ConfigError
from ..evaluation.coco import METRIC_NAMES, RECALL_NAMES
from ..utils import distributed as dist_utils
from ..utils.checkpoint import save_checkpoint, unwrap_model
from ..utils.env import get_rng_state, set_rng_state
from .hooks import HookBase

__all__ = ["EvalHook", "BestCheckpointer", "coco_evaluator", "flatten_metrics", "check_best_metric", "BEST_FILE"]

BEST_FILE = "model_best.pth"

#: ``{dataset spec: {iou type: {metric: value}}}``, what an evaluation function returns on rank 0.
Results = Dict[str, Dict[str, Dict[str, float]]]


def flatten_metrics(results: Results) -> Dict[str, float]:
    """``{"bbox/AP": ...}`` from ``{spec: {"bbox": {"AP": ...}}}``; with several datasets the keys start with the
    dataset spec (``"synthetic:val/bbox/AP"``)."""
    several = len(results) > 1
    out: Dict[str, float] = {}
    for spec, per_type in results.items():
        for iou_type, metrics in per_type.items():
            for name, value in metrics.items():
                out[f"{spec}/{iou_type}/{name}" if several else f"{iou_type}/{name}"] = float(value)
    return out


def check_best_metric(metric: str, datasets: Sequence[Tuple[str, Any]], mask_on: bool, eval_period: int) -> str:
    """Validate cfg ``SOLVER.CHECKPOINT_BEST`` against the evaluation that will run; returns the metric's key in the
    flattened results (see :func:`flatten_metrics`). Raises ``ConfigError`` naming the key, the value and the fix.

    Args:
        metric: e.g. ``"segm/AP"``, ``"bbox/AP50"``, ``"bbox/AR100"``, ``"segm/AP-person"``, or
            ``"<dataset>/bbox/AP"`` (required with several test datasets).
        datasets: ``(spec, dataset)`` of ``TEST.DATASETS``; a dataset's ``classes`` name the per-category metrics.
        mask_on: cfg ``MODEL.MASK_ON`` (``segm`` metrics need masks).
        eval_period: cfg ``TEST.EVAL_PERIOD``.
    """
    where = f"SOLVER.CHECKPOINT_BEST = {metric!r}"
    if int(eval_period) <= 0:
        raise ConfigError(f"{where} needs evaluations during training: set TEST.EVAL_PERIOD > 0 (e.g. "
                          f"--set TEST.EVAL_PERIOD 5000) or SOLVER.CHECKPOINT_BEST ''")
    if not datasets:
        raise ConfigError(f"{where} needs a test dataset: set TEST.DATASETS or pass --test_dataset")
    specs = [s for s, _ in datasets]
    parts = metric.split("/")
    if len(parts) < 2:
        raise ConfigError(f"{where}: expected '<bbox|segm>/<metric>', e.g. 'segm/AP' or 'bbox/AP50'")
    if len(datasets) > 1:
        spec = "/".join(parts[:-2])
        if spec not in specs:
            raise ConfigError(f"{where}: with several TEST.DATASETS the metric starts with the dataset, one of "
                              f"{specs}, e.g. '{specs[0]}/bbox/AP'")
    else:
        spec = "/".join(parts[:-2])
        if spec and spec != specs[0]:
            raise ConfigError(f"{where}: {spec!r} is not the test dataset {specs[0]!r}; write e.g. 'bbox/AP'")
        spec = specs[0]
    iou_type, name = parts[-2], parts[-1]
    types = ["bbox", "segm"] if mask_on else ["bbox"]
    if iou_type not in types:
        raise ConfigError(f"{where}: the evaluation gives {' and '.join(types)} metrics"
                          + ("" if mask_on else " (MODEL.MASK_ON is False)") + f", not {iou_type!r}")
    dataset = dict(datasets)[spec]
    classes = [str(c) for c in list(getattr(dataset, "classes", []) or [])[1:]]
    allowed = list(METRIC_NAMES) + list(RECALL_NAMES) + [f"AP-{c}" for c in classes]
    if name not in allowed:
        raise ConfigError(f"{where}: unknown metric {name!r}; one of {', '.join(allowed)}")
    return f"{spec}/{iou_type}/{name}" if len(datasets) > 1 else f"{iou_type}/{name}"


def coco_evaluator(model, datasets: Sequence[Tuple[str, Any]], cfg, device: Any = "cpu", num_workers: int = 0,
                   log: Optional[Callable[[str], Any]] = None) -> Callable[[], Optional[Results]]:
    """The evaluation ``maskrcnn-test`` runs, as a function of no arguments for :class:`EvalHook`: a copy of
    ``model`` (unwrapped from DDP) prepared for inference with ``cfg``'s ``TEST`` settings, evaluated on each
    ``(spec, dataset)`` (no result files written). Returns the results on rank 0, None on the other ranks; every
    process must call it."""
    from .inference import evaluate_on_dataset
    from .speed import prepare_for_inference

    def evaluate() -> Optional[Results]:
        # A copy: the inference speed features (folded BN, fused convolutions) make a model unfit for training.
        net = prepare_for_inference(copy.deepcopy(unwrap_model(model)), cfg)
        out: Results = {}
        try:
            for spec, dataset in datasets:
                metrics = evaluate_on_dataset(net, dataset, cfg, device=device, output_dir=None,
                                              num_workers=num_workers, log=log)
                if metrics is not None:
                    out[spec] = metrics
        finally:
            del net
        return out if dist_utils.is_main_process() else None

    return evaluate


class BestCheckpointer:
    """Keeps ``output_dir/model_best.pth``: the weights at the evaluation with the highest ``metric`` so far.

    The file holds ``{"model", "iteration", "cfg", "best_metric", "best_value", **extra}`` (weights only: load it
    with ``--load_ckpt``, ``maskrcnn-test`` or ``Predictor``; it is never what ``--resume`` picks). Only the
    process with ``save_to_disk`` writes.

    Args:
        output_dir, model: where and what (possibly DDP-wrapped).
        metric: a key of the flattened results (:func:`check_best_metric` returns it); higher is better.
        cfg_yaml, extra: stored with the weights (train_net: the config and the dataset's ``classes``).
        previous: ``metrics.jsonl`` records of the run so far (a resumed run): the best value starts from them.
    """

    def __init__(self, output_dir: str, model, metric: str, cfg_yaml: Optional[str] = None,
                 extra: Optional[Mapping[str, Any]] = None, save_to_disk: bool = True,
                 previous: Sequence[Mapping[str, Any]] = (), logger: Optional[logging.Logger] = None):
        self.path = os.path.join(os.fspath(output_dir), BEST_FILE)
        self.model = model
        self.metric = metric
        self.cfg_yaml = cfg_yaml
        self.extra = dict(extra or {})
        self.save_to_disk = bool(save_to_disk)
        self.logger = logger or logging.getLogger("maskrcnn.train")
        self.best_value: Optional[float] = None
        self.best_iteration: Optional[int] = None
        for rec in previous:
            v = rec.get(metric)
            if rec.get("type") == "eval" and isinstance(v, (int, float)) and not math.isnan(v):
                if self.best_value is None or v > self.best_value:
                    self.best_value, self.best_iteration = float(v), int(rec["iteration"])

    def update(self, iteration: int, metrics: Mapping[str, float]) -> bool:
        """Save the weights when ``metrics[metric]`` beats the best so far; returns whether it did."""
        v = metrics.get(self.metric)
        if v is None or math.isnan(float(v)):
            self.logger.warning("SOLVER.CHECKPOINT_BEST: %s is missing or NaN at iteration %d; %s not updated",
                                self.metric, iteration, BEST_FILE)
            return False
        v = float(v)
        if self.best_value is not None and not v > self.best_value:
            self.logger.info("%s %.3f at iteration %d (best %.3f at iteration %d)", self.metric, v, iteration,
                             self.best_value, self.best_iteration)
            return False
        self.best_value, self.best_iteration = v, int(iteration)
        if self.save_to_disk:
            self._save(unwrap_model(self.model).state_dict(), iteration, v)
            self.logger.info("new best %s %.3f at iteration %d: wrote %s", self.metric, v, iteration, self.path)
        return True

    def _save(self, state: Mapping[str, Any], iteration: int, value: float) -> None:
        payload = {"model": {k: t.detach().cpu() for k, t in state.items()}, "iteration": int(iteration),
                   "cfg": self.cfg_yaml, "best_metric": self.metric, "best_value": float(value)}
        payload.update(self.extra)
        save_checkpoint(self.path, payload)

    def reconcile(self, start_iter: int) -> None:
        """Make ``model_best.pth`` agree with the kept ``metrics.jsonl`` records of a run (re)starting at
        ``start_iter`` (0: a new run; K: resumed from the checkpoint of iteration K, ``self.model`` holding its
        weights). A file written after that checkpoint (or by another run, or for another metric) belongs to
        evaluations that were dropped: it is replaced by the weights of the best kept evaluation when they are at
        hand (the resumed weights, or the periodic checkpoint of that iteration), else removed with a warning.
        Only the process with ``save_to_disk`` acts."""
        if not self.save_to_disk or not os.path.isfile(self.path):
            return
        from ..utils.checkpoint import load_checkpoint

        old = load_checkpoint(self.path)
        if old.get("best_metric") == self.metric and self.best_iteration == int(old.get("iteration", -1)):
            return  # written at the best kept evaluation (the previous records are those up to start_iter)
        reason = (f"it holds iteration {old.get('iteration')} by {old.get('best_metric')!r}, not the best kept "
                  f"evaluation" + ("" if self.best_iteration is None else
                                   f" ({self.metric} {self.best_value:.3f} at iteration {self.best_iteration})"))
        if self.best_iteration is not None:
            source = None
            if self.best_iteration == int(start_iter):
                source, state = "the resumed checkpoint", unwrap_model(self.model).state_dict()
            else:
                path = os.path.join(os.path.dirname(self.path), f"model_{self.best_iteration:07d}.pth")
                if os.path.isfile(path):
                    source, state = path, load_checkpoint(path)["model"]
            if source is not None:
                self._save(state, self.best_iteration, self.best_value)
                self.logger.info("%s: %s; rewritten from %s", self.path, reason, source)
                return
        os.remove(self.path)
        self.logger.warning("%s: %s; removed (%s)", self.path, reason,
                            "no evaluation kept" if self.best_iteration is None else
                            f"no checkpoint of iteration {self.best_iteration} left to take the weights from; the next "
                            f"evaluation above {self.best_value:.3f} writes it again")


class EvalHook(HookBase):
    """Runs ``evaluate()`` every ``period`` iterations done and after the last iteration, on every process.

    Args:
        period: cfg ``TEST.EVAL_PERIOD`` (> 0).
        evaluate: returns :data:`Results` on rank 0 and None elsewhere (:func:`coco_evaluator`); every process
            calls it, at the same iterations.
        metrics_writer: :class:`~maskrcnn.engine.metrics.MetricsWriter` of rank 0 (None elsewhere): gets the
            ``"eval"`` record.
        best: optional :class:`BestCheckpointer`.
        logger: where the summary line goes.

    Attributes:
        history: the ``"eval"`` records of this run, on every process.
    """

    def __init__(self, period: int, evaluate: Callable[[], Optional[Results]], metrics_writer=None,
                 best: Optional[BestCheckpointer] = None, logger: Optional[logging.Logger] = None):
        if int(period) < 1:
            raise ValueError(f"EvalHook: period must be >= 1, got {period}")
        self.period = int(period)
        self.evaluate = evaluate
        self.metrics_writer = metrics_writer
        self.best = best
        self.logger = logger or logging.getLogger("maskrcnn.train")
        self.history: List[Dict[str, Any]] = []

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done % self.period == 0 or done == self.trainer.max_iter:
            self.run(done)

    def run(self, done: int) -> Dict[str, Any]:
        """Evaluate now, as after ``done`` iterations; returns the ``"eval"`` record."""
        # With SOLVER.EMA_DECAY the averaged weights are the ones evaluated (and kept as model_best.pth), as in
        # model_final.pth; EMAHook runs before this hook, so they include this iteration.
        ema = getattr(self.trainer, "ema", None) if getattr(self, "trainer", None) is not None else None
        with ema.apply_to(self.trainer.model) if ema is not None else contextlib.nullcontext():
            return self._run(done)

    def _run(self, done: int) -> Dict[str, Any]:
        rng = get_rng_state()  # inference may draw random numbers (data loader seeds); training must not notice
        start = time.perf_counter()
        try:
            results = self.evaluate()
        finally:
            set_rng_state(rng)
        flat = flatten_metrics(results) if dist_utils.is_main_process() and results is not None else None
        if dist_utils.get_world_size() > 1:
            flat = dist_utils.broadcast_object(flat)
        seconds = time.perf_counter() - start
        record: Dict[str, Any] = {"type": "eval", "iteration": int(done)}
        record.update(flat or {})
        record["eval_time"] = seconds
        headline = [f"{k} {v:.2f}" for k, v in (flat or {}).items() if k.split("/")[-1] == "AP"]
        self.logger.info("evaluation at iteration %d (%.1f s): %s", done, seconds,
                         ", ".join(headline) or "no metrics")
        if self.metrics_writer is not None:
            self.metrics_writer.write(record)
        if self.best is not None:
            self.best.update(done, flat or {})
        self.history.append(record)
        return record
