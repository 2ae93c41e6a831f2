"""maskrcnn.engine.evaluation_hook: periodic and final evaluations, their records, the best checkpoint, the
metric-name checks, and the COCO evaluator (on the oracle detector: exactly 100 AP, every AR and per-class AP)."""
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import pytest
import torch

from maskrcnn.config import ConfigError, get_cfg
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.evaluation_hook import (BEST_FILE, BestCheckpointer, EvalHook, check_best_metric,
                                             coco_evaluator, flatten_metrics)
from maskrcnn.engine.inference import evaluate_on_dataset
from maskrcnn.engine.metrics import MetricsWriter, read_metrics
from maskrcnn.evaluation.coco import METRIC_NAMES, RECALL_NAMES
from maskrcnn.utils.checkpoint import load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import IndexedImages, OracleDetector  # noqa: E402

CLASSES = ("rectangle", "ellipse", "triangle")


class _FakeTrainer:
    def __init__(self, max_iter: int, start_iter: int = 0):
        self.max_iter, self.start_iter, self.iter = max_iter, start_iter, start_iter


def _drive(hooks, trainer):
    for h in hooks:
        h.trainer = trainer
        h.before_train()
    for it in range(trainer.start_iter, trainer.max_iter):
        trainer.iter = it
        for h in hooks:
            h.after_step()
    for h in hooks:
        h.after_train()
        h.close()


def _results(ap: float, segm: bool = True) -> Dict[str, Dict[str, Dict[str, float]]]:
    per_type = {"bbox": {"AP": ap, "AP50": ap + 10, "AR100": ap + 20, "AP-rectangle": ap - 1}}
    if segm:
        per_type["segm"] = {"AP": ap / 2, "AP50": ap, "AR100": ap, "AP-rectangle": ap / 3}
    return {"synthetic:val": per_type}


def test_flatten_metrics_one_and_several_datasets():
    assert flatten_metrics(_results(30.0, segm=False)) == {"bbox/AP": 30.0, "bbox/AP50": 40.0, "bbox/AR100": 50.0,
                                                           "bbox/AP-rectangle": 29.0}
    two = {"a:val": {"bbox": {"AP": 1.0}}, "b:val": {"bbox": {"AP": 2.0}}}
    assert flatten_metrics(two) == {"a:val/bbox/AP": 1.0, "b:val/bbox/AP": 2.0}


def test_eval_hook_runs_every_period_and_after_the_last_iteration_and_writes_records(tmp_path):
    calls: List[int] = []
    trainer = _FakeTrainer(max_iter=7)

    def evaluate():
        calls.append(trainer.iter + 1)
        torch.rand(5)  # inference may draw random numbers: training must not see it
        return _results(float(len(calls)))

    writer = MetricsWriter(str(tmp_path))
    hook = EvalHook(3, evaluate, metrics_writer=writer)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    _drive([hook], trainer)
    assert torch.equal(torch.rand(3), expected)  # the global RNG state was restored around every evaluation
    writer.close()
    assert calls == [3, 6, 7]
    recs = read_metrics(str(tmp_path))
    assert [(r["type"], r["iteration"]) for r in recs] == [("eval", 3), ("eval", 6), ("eval", 7)]
    assert [r["bbox/AP"] for r in recs] == [1.0, 2.0, 3.0] and recs[2]["segm/AP-rectangle"] == 1.0
    assert all(r["eval_time"] >= 0 for r in recs)
    assert [r["iteration"] for r in hook.history] == [3, 6, 7]
    with pytest.raises(ValueError, match="EvalHook: period must be >= 1, got 0"):
        EvalHook(0, evaluate)


def test_eval_hook_of_a_resumed_run_counts_iterations_from_the_start():
    calls = []
    trainer = _FakeTrainer(max_iter=10, start_iter=5)
    _drive([EvalHook(4, lambda: calls.append(trainer.iter + 1) or _results(1.0))], trainer)
    assert calls == [8, 10]


def test_best_checkpointer_keeps_the_weights_of_the_best_evaluation(tmp_path):
    model = torch.nn.Linear(2, 1)
    best = BestCheckpointer(str(tmp_path), model, "segm/AP", cfg_yaml="A: 1\n", extra={"classes": ["bg", "x"]})
    saved = []
    for it, ap in [(2, 10.0), (4, 30.0), (6, 20.0), (8, float("nan")), (10, 30.0), (12, 40.0)]:
        with torch.no_grad():
            model.weight.fill_(it)
        if best.update(it, {"segm/AP": ap}):
            saved.append(it)
    assert saved == [2, 4, 12]  # a tie is not an improvement; NaN is skipped
    ck = load_checkpoint(str(tmp_path / BEST_FILE))
    assert ck["iteration"] == 12 and ck["best_metric"] == "segm/AP" and ck["best_value"] == 40.0
    assert ck["cfg"] == "A: 1\n" and ck["classes"] == ["bg", "x"] and torch.all(ck["model"]["weight"] == 12)
    assert "optimizer" not in ck  # weights: never what --resume picks
    assert not best.update(14, {"bbox/AP": 99.0})  # the metric is missing: warned, nothing written


def test_best_checkpointer_resumes_from_the_kept_records_and_only_rank_0_writes(tmp_path):
    previous = [{"type": "train", "iteration": 2, "total_loss": 1.0},
                {"type": "eval", "iteration": 2, "bbox/AP": 50.0},
                {"type": "eval", "iteration": 4, "bbox/AP": 45.0, }]
    best = BestCheckpointer(str(tmp_path), torch.nn.Linear(1, 1), "bbox/AP", previous=previous)
    assert (best.best_value, best.best_iteration) == (50.0, 2)
    assert not best.update(6, {"bbox/AP": 49.0})
    other_rank = BestCheckpointer(str(tmp_path), torch.nn.Linear(1, 1), "bbox/AP", save_to_disk=False)
    assert other_rank.update(6, {"bbox/AP": 1.0}) and not (tmp_path / BEST_FILE).exists()
    assert best.update(8, {"bbox/AP": 51.0}) and (tmp_path / BEST_FILE).exists()


def _evals(*pairs):
    return [{"type": "eval", "iteration": it, "bbox/AP": ap} for it, ap in pairs]


def _first_run(tmp_path, pairs):
    """A run that evaluated at ``pairs`` (iteration, bbox/AP) with weights filled with the iteration; returns the
    model. Periodic checkpoints exist for iterations 2 and 4 only."""
    model = torch.nn.Linear(2, 1)
    best = BestCheckpointer(str(tmp_path), model, "bbox/AP")
    for it, ap in pairs:
        with torch.no_grad():
            model.weight.fill_(it)
        best.update(it, {"bbox/AP": ap})
        if it in (2, 4):
            torch.save({"model": model.state_dict(), "iteration": it}, str(tmp_path / f"model_{it:07d}.pth"))
    return model


def _best_file(tmp_path):
    ck = load_checkpoint(str(tmp_path / BEST_FILE))
    return ck["iteration"], ck["best_value"], float(ck["model"]["weight"].flatten()[0])


@pytest.mark.parametrize("resume_at, pairs, expected", [
    (4, [(2, 10.0), (4, 30.0), (6, 20.0)], (4, 30.0, 4.0)),     # written at a kept evaluation: left alone
    (4, [(2, 10.0), (4, 30.0), (6, 40.0)], (4, 30.0, 4.0)),     # best at 6 dropped: the resumed weights (4)
    (6, [(2, 30.0), (4, 10.0), (6, 5.0), (7, 40.0)], (2, 30.0, 2.0)),  # best at 2: from model_0000002.pth
])
def test_best_checkpoint_of_a_resumed_run_agrees_with_the_kept_records(tmp_path, resume_at, pairs, expected):
    model = _first_run(tmp_path, pairs)
    with torch.no_grad():
        model.weight.fill_(resume_at)  # the resumed checkpoint's weights
    kept = [r for r in _evals(*pairs) if r["iteration"] <= resume_at]
    BestCheckpointer(str(tmp_path), model, "bbox/AP", previous=kept).reconcile(resume_at)
    assert _best_file(tmp_path) == expected


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def test_best_checkpoint_without_the_weights_of_the_kept_best_or_of_another_run_is_removed(tmp_path):
    log = logging.getLogger("test.evaluation_hook.reconcile")
    log.propagate = False
    lines = _Lines()
    log.handlers[:] = [lines]
    model = _first_run(tmp_path, [(1, 30.0), (3, 40.0)])  # no checkpoint of iteration 1
    kept = _evals((1, 30.0))
    BestCheckpointer(str(tmp_path), model, "bbox/AP", previous=kept, logger=log).reconcile(2)
    assert not (tmp_path / BEST_FILE).exists()
    assert "no checkpoint of iteration 1 left" in lines.text and "holds iteration 3" in lines.text
    _first_run(tmp_path, [(2, 5.0)])
    BestCheckpointer(str(tmp_path), model, "bbox/AP", logger=log).reconcile(0)  # a new run in the same folder
    assert not (tmp_path / BEST_FILE).exists() and "no evaluation kept" in lines.text
    _first_run(tmp_path, [(2, 5.0)])
    other_metric = BestCheckpointer(str(tmp_path), model, "segm/AP", previous=[{"type": "eval", "iteration": 2,
                                                                                "segm/AP": 1.0}])
    with torch.no_grad():
        model.weight.fill_(-1.0)
    other_metric.reconcile(2)  # the resumed run ranks by another metric: rewritten for it
    ck = load_checkpoint(str(tmp_path / BEST_FILE))
    assert ck["best_metric"] == "segm/AP" and ck["iteration"] == 2 and float(ck["model"]["weight"][0, 0]) == -1.0
    BestCheckpointer(str(tmp_path), model, "segm/AP", save_to_disk=False).reconcile(0)  # not rank 0: no action
    assert (tmp_path / BEST_FILE).exists()


def _val(n=6):
    return IndexedImages(SyntheticShapesDataset("val", num_images=n, image_size=(48, 48), max_object_size=30))


@pytest.mark.parametrize("metric, key", [("segm/AP", "segm/AP"), ("bbox/AP50", "bbox/AP50"),
                                         ("bbox/AR100", "bbox/AR100"), ("segm/AP-ellipse", "segm/AP-ellipse"),
                                         ("synthetic:val/bbox/AP", "bbox/AP")])
def test_check_best_metric_accepts_metric_names(metric, key):
    assert check_best_metric(metric, [("synthetic:val", _val())], mask_on=True, eval_period=10) == key


@pytest.mark.parametrize("metric, mask_on, period, datasets, needle", [
    ("segm/AP", True, 0, 1, "needs evaluations during training: set TEST.EVAL_PERIOD > 0"),
    ("segm/AP", True, 10, 0, "needs a test dataset: set TEST.DATASETS or pass --test_dataset"),
    ("AP", True, 10, 1, "expected '<bbox|segm>/<metric>'"),
    ("segm/AP", False, 10, 1, "gives bbox metrics (MODEL.MASK_ON is False), not 'segm'"),
    ("bbox/mAP", True, 10, 1, "unknown metric 'mAP'; one of AP, AP50"),
    ("bbox/AP-hexagon", True, 10, 1, "AP-rectangle, AP-ellipse, AP-triangle"),
    ("other:val/bbox/AP", True, 10, 1, "'other:val' is not the test dataset 'synthetic:val'"),
    ("bbox/AP", True, 10, 2, "with several TEST.DATASETS the metric starts with the dataset"),
])
def test_check_best_metric_errors_name_the_key_and_the_fix(metric, mask_on, period, datasets, needle):
    ds = [("synthetic:val", _val()), ("synthetic:train", _val())][:datasets]
    with pytest.raises(ConfigError) as e:
        check_best_metric(metric, ds, mask_on=mask_on, eval_period=period)
    assert f"SOLVER.CHECKPOINT_BEST = {metric!r}" in str(e.value) and needle in str(e.value)


def _oracle_cfg():
    cfg = get_cfg()
    # The oracle has no convolution: none of the inference speed features applies to it.
    cfg.TEST.FUSE_FROZEN_BN = False
    cfg.TEST.FUSE_CONV_ACTIVATIONS = False
    cfg.TEST.CHANNELS_LAST = False
    return cfg


def test_coco_evaluator_evaluates_a_copy_and_gives_every_ap_ar_and_class_ap():
    ds = _val()
    model = OracleDetector(ds)
    model.train()
    lines = []
    results = coco_evaluator(model, [("synthetic:val", ds)], _oracle_cfg(), log=lines.append)()
    flat = flatten_metrics(results)
    expected = {f"{t}/{k}" for t in ("bbox", "segm")
                for k in list(METRIC_NAMES) + list(RECALL_NAMES) + [f"AP-{c}" for c in CLASSES]}
    assert set(flat) == expected
    assert flat["bbox/AP"] == pytest.approx(100.0) and flat["segm/AP"] == pytest.approx(100.0)
    assert flat["segm/AR100"] == pytest.approx(100.0)
    present = {c for i in range(len(ds)) for c in ds[i][1]["labels"].tolist()}
    for label in present:
        assert flat[f"bbox/AP-{CLASSES[label - 1]}"] == pytest.approx(100.0)
    assert model.training and model.calls == 0  # the trained model is untouched: a copy ran
    assert any("per-category segm AP" in line for line in lines)


def test_test_net_metrics_json_carries_recall_and_per_category_ap(tmp_path):
    ds = _val()
    metrics = evaluate_on_dataset(OracleDetector(ds), ds, get_cfg(), output_dir=str(tmp_path), log=lambda m: None)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(saved[iou_type]) == set(METRIC_NAMES) | set(RECALL_NAMES) | {f"AP-{c}" for c in CLASSES}
        assert saved[iou_type]["AR100"] == pytest.approx(100.0)
        present = {CLASSES[c - 1] for i in range(len(ds)) for c in ds[i][1]["labels"].tolist()}
        for name in present:
            assert saved[iou_type][f"AP-{name}"] == pytest.approx(metrics[iou_type][f"AP-{name}"]) == 100.0
