"""maskrcnn.engine.metrics: metrics.jsonl records, cut back on resume, mirrored to TensorBoard (event files read
back); LogHook's training records; the trainer's gradient norm without clipping."""
import json
import logging
import os
import sys

import pytest
import torch

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.hooks import LogHook, TensorboardWriter
from maskrcnn.engine.metrics import (METRICS_FILE, MetricsWriter, peak_memory_mb, read_metrics, scalar_tags,
                                     truncate_metrics)
from maskrcnn.engine.solver import build_optimizer
from maskrcnn.engine.trainer import Trainer

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402


def _train(it, loss):
    return {"type": "train", "iteration": it, "total_loss": loss, "loss_a": loss / 2, "lr": 0.01 * it,
            "time": 0.5, "data_time": 0.1, "memory_mb": 100.0, "peak_memory_mb": 120.0, "grad_norm": 2.0 * it}


def _eval(it, ap):
    return {"type": "eval", "iteration": it, "bbox/AP": ap, "bbox/AP-cat": ap / 2, "bbox/APl": float("nan"),
            "eval_time": 3.0}


def test_writer_appends_one_json_line_per_record_with_nan_as_null(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write(_train(1, 4.0))
    w.write(_eval(1, 12.5))
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()  # flushed before close: readable while training
    assert [json.loads(line)["type"] for line in lines] == ["train", "eval"]
    w.close()
    recs = read_metrics(str(tmp_path))
    assert recs[0] == _train(1, 4.0)
    assert recs[1]["bbox/APl"] is None and recs[1]["bbox/AP"] == 12.5 and recs[1]["bbox/AP-cat"] == 6.25
    assert read_metrics(str(tmp_path / METRICS_FILE)) == recs
    with pytest.raises(ValueError, match="needs an 'iteration'"):
        MetricsWriter(str(tmp_path)).write({"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="no metrics file .*nowhere.*metrics.jsonl"):
        read_metrics(str(tmp_path / "nowhere"))


def test_resume_drops_records_past_the_checkpoint_and_a_cut_line_then_appends(tmp_path):
    w = MetricsWriter(str(tmp_path))
    for it in range(1, 7):
        w.write(_train(it, 10.0 - it))
        if it % 2 == 0:
            w.write(_eval(it, 5.0 * it))
    w.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"type": "train", "iteration": 7, "total_lo')  # killed in the middle of a line
    # Resumed from the checkpoint of iteration 4: 5, 6 and the cut line go; 5..8 are logged again.
    w = MetricsWriter(str(tmp_path), start_iter=4)
    assert [(r["type"], r["iteration"]) for r in w.previous] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    for it in range(5, 9):
        w.write(_train(it, 100.0 + it))
    w.close()
    recs = read_metrics(str(tmp_path))
    train_iters = [r["iteration"] for r in recs if r["type"] == "train"]
    assert train_iters == list(range(1, 9))  # each iteration exactly once, none missing
    assert [r["iteration"] for r in recs if r["type"] == "eval"] == [2, 4]
    assert [r["total_loss"] for r in recs if r["type"] == "train"][4:] == [105.0, 106.0, 107.0, 108.0]


def test_truncate_leaves_an_intact_file_alone_and_a_fresh_run_starts_empty(tmp_path):
    path = str(tmp_path / METRICS_FILE)
    assert truncate_metrics(path, 3) == []  # no file yet
    w = MetricsWriter(str(tmp_path))
    w.write(_train(1, 1.0))
    w.write(_train(2, 1.0))
    w.close()
    before = os.stat(path)
    assert len(truncate_metrics(path, 5)) == 2
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)  # not rewritten
    # A new run (not --resume) in the same folder starts at 0: the old records go.
    MetricsWriter(str(tmp_path), start_iter=0).close()
    assert read_metrics(str(tmp_path)) == []


def test_scalar_tags_name_train_and_eval_values():
    tags = scalar_tags(dict(_train(3, 4.0), loss_mask=0.5, skipped_steps=1, grad_norm=None))
    assert tags == {"loss/total_loss": 4.0, "loss/loss_a": 2.0, "loss/loss_mask": 0.5, "lr": pytest.approx(0.03),
                    "time/iter": 0.5, "time/data": 0.1, "memory/mb": 100.0, "memory/peak_mb": 120.0,
                    "skipped_steps": 1.0}
    assert scalar_tags(_eval(2, 10.0)) == {"bbox/AP": 10.0, "bbox/AP-cat": 5.0, "time/eval": 3.0}  # NaN left out


def _event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_same_values_and_a_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra (pinned in requirements-dev.txt)")
    tb_dir = str(tmp_path / "tb")
    w = MetricsWriter(str(tmp_path), tb_writer=TensorboardWriter(tb_dir))
    for it in (1, 2, 3, 4):
        w.write(_train(it, 10.0 - it))
    w.write(_eval(4, 33.25))
    w.close()
    scalars = _event_scalars(tb_dir)
    recs = read_metrics(str(tmp_path))
    for rec in recs:
        for tag, value in scalar_tags(rec).items():
            assert (rec["iteration"], pytest.approx(value)) in scalars[tag], (tag, rec["iteration"])
    assert [s for s, _ in scalars["loss/total_loss"]] == [1, 2, 3, 4]
    assert scalars["bbox/AP"] == [(4, 33.25)] and "bbox/APl" not in scalars  # NaN: nothing written

    # Resumed at iteration 2: TensorBoard drops steps >= 3 of the first run, as metrics.jsonl does.
    w = MetricsWriter(str(tmp_path), start_iter=2, tb_writer=TensorboardWriter(tb_dir, purge_step=3))
    for it in (3, 4):
        w.write(_train(it, 50.0 + it))
    w.close()
    scalars = _event_scalars(tb_dir)
    assert scalars["loss/total_loss"] == [(1, 9.0), (2, 8.0), (3, 53.0), (4, 54.0)]
    assert "bbox/AP" not in scalars or scalars["bbox/AP"] == []
    assert [r["total_loss"] for r in read_metrics(str(tmp_path))] == [9.0, 8.0, 53.0, 54.0]


def _loader():
    ds = SyntheticShapesDataset("train", num_images=8, image_size=(32, 32), max_object_size=16)
    return build_train_loader(ds, ims_per_batch=2, aspect_grouping=False, seed=0)


def test_log_hook_writes_a_train_record_per_line_with_the_line_values(tmp_path):
    torch.manual_seed(0)
    model = ToyDetector()
    opt = build_optimizer(model, base_lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    logger = logging.getLogger("test.metrics.loghook")
    logger.handlers.clear()
    logger.propagate = False
    writer = MetricsWriter(str(tmp_path))
    hook = LogHook(period=2, logger=logger, show_bar=False, metrics_writer=writer)
    Trainer(model, opt, sched, _loader(), max_iter=5, hooks=[hook]).train()
    recs = read_metrics(str(tmp_path))
    assert [r["iteration"] for r in recs] == [2, 4, 5] and all(r["type"] == "train" for r in recs)
    last = recs[-1]
    assert set(last) == {"type", "iteration", "total_loss", "loss_a", "loss_b", "lr", "time", "data_time",
                         "memory_mb", "peak_memory_mb", "grad_norm"}
    assert last["total_loss"] == pytest.approx(last["loss_a"] + last["loss_b"])  # window of 1 at the last line
    assert f"loss {last['total_loss']:.4f}" in hook.last_line and f"grad_norm {last['grad_norm']:.3f}" in hook.last_line
    assert last["lr"] == pytest.approx(0.05) and last["grad_norm"] > 0
    assert 0 < last["memory_mb"] <= last["peak_memory_mb"]
    assert writer._file.closed  # LogHook.close closes it


def test_trainer_reports_the_gradient_norm_without_clipping_as_clipping_computes_it():
    norms = {}
    for clip in (0.0, 1e9):  # 1e9: clips nothing, returns the norm
        torch.manual_seed(0)
        model = ToyDetector()
        opt = build_optimizer(model, base_lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
        t = Trainer(model, opt, sched, _loader(), max_iter=3, clip_grad_norm=clip)
        t.train()
        norms[clip] = (t.grad_norm, {k: v.clone() for k, v in model.state_dict().items()})
    assert norms[0.0][0] == pytest.approx(norms[1e9][0], rel=1e-6)
    for k, v in norms[0.0][1].items():
        assert torch.equal(v, norms[1e9][1][k]), k  # reading the norm changes no update


def test_peak_memory_is_positive_on_the_cpu():
    assert peak_memory_mb("cpu") > 0 and peak_memory_mb(None) > 0
