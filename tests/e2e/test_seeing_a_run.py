"""Seeing a run through the tools (real model, tiny synthetic config): evaluation during training, ``metrics.jsonl``
across an interrupted and resumed run, TensorBoard scalars read back, ``model_best.pth``, the curves, and the demo.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from maskrcnn.engine.metrics import read_metrics, scalar_tags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
LOSSES = {"loss_cls", "loss_bbox", "loss_mask", "loss_rpn_cls", "loss_rpn_bbox"}


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_train_interrupted_and_resumed_with_evaluations_metrics_tensorboard_best_and_plot(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra (pinned in requirements-dev.txt)")
    train, test = _tool("train_net"), _tool("test_net")
    out = tmp_path / "run"
    args = ["--cfg", SMOKE, "--nw", "0", "--output_dir", str(out), "--use_tfboard", "--set", "TRAIN.SNAPSHOT_ITERS",
            "2", "TRAIN.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_BEST", "bbox/AR100"]
    assert train.main(args + ["SOLVER.MAX_ITER", "3"]) == 0
    # Interrupted after iteration 3 was logged and evaluated but before its checkpoint: the newest checkpoint is
    # iteration 2's, so the resumed run redoes iteration 3 and its records must replace, not repeat, the first ones.
    assert [(r["type"], r["iteration"]) for r in read_metrics(str(out))] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    os.remove(out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_0000002.pth")
    assert train.main(args + ["SOLVER.MAX_ITER", "4", "--resume"]) == 0

    recs = read_metrics(str(out))
    assert [(r["type"], r["iteration"]) for r in recs] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    for r in (r for r in recs if r["type"] == "train"):
        assert LOSSES <= set(r) and {"lr", "time", "data_time", "memory_mb", "peak_memory_mb", "grad_norm"} <= set(r)
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in LOSSES), rel=1e-5)  # LOG_PERIOD 1: no median
        assert r["lr"] == pytest.approx(0.01) and r["grad_norm"] > 0 and r["time"] > 0 and r["data_time"] >= 0
        assert 0 < r["memory_mb"] <= r["peak_memory_mb"]
    evals = [r for r in recs if r["type"] == "eval"]
    classes = ("rectangle", "ellipse", "triangle")
    for r in evals:
        for t in ("bbox", "segm"):
            expected = {f"{t}/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
                                             "ARs", "ARm", "ARl")} | {f"{t}/AP-{c}" for c in classes}
            assert expected <= set(r)
        assert r["eval_time"] > 0
    log = (out / "log.txt").read_text()
    assert "evaluation at iteration 2" in log and "evaluation at iteration 4" in log

    # The evaluation during training is maskrcnn-test's: the same numbers for the same weights.
    assert test.main(["--cfg", SMOKE, "--load_ckpt", str(out / "model_final.pth"), "--dataset", "synthetic:val",
                      "--output_dir", str(tmp_path / "test")]) == 0
    final = json.loads((tmp_path / "test" / "metrics.json").read_text())
    for t, metrics in final.items():
        assert set(metrics) == {k.split("/", 1)[1] for k in evals[-1] if k.startswith(t + "/")}
        for k, v in metrics.items():
            if v is None:
                assert evals[-1][f"{t}/{k}"] is None, k
            else:
                assert evals[-1][f"{t}/{k}"] == pytest.approx(v, abs=1e-9), k
    assert final["bbox"]["AR100"] > 0  # a few iterations already recall some objects: the comparison means something

    # model_best.pth: the weights of the evaluation with the highest bbox/AR100 (the first one on a tie).
    best_rec = max(evals, key=lambda r: (r["bbox/AR100"], -r["iteration"]))
    best = torch.load(str(out / "model_best.pth"), map_location="cpu", weights_only=True)
    assert best["best_metric"] == "bbox/AR100" and best["iteration"] == best_rec["iteration"]
    assert best["best_value"] == pytest.approx(best_rec["bbox/AR100"])
    at = torch.load(str(out / ("model_final.pth" if best["iteration"] == 4 else "model_0000002.pth")),
                    map_location="cpu", weights_only=True)
    for k, v in best["model"].items():
        assert torch.equal(v, at["model"][k]), k

    # TensorBoard holds the same values; the resumed run purged the first run's iteration 3 (train and eval).
    scalars = _event_scalars(str(out / "tb"))
    for r in recs:
        for tag, value in scalar_tags(r).items():
            assert [v for s, v in scalars[tag] if s == r["iteration"]] == [pytest.approx(value, rel=1e-6)], tag
    assert [s for s, _ in scalars["loss/total_loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["bbox/AP"]] == [2, 4]

    # Evaluating (on a model copy, RNG state restored) and resuming changed nothing: the weights equal a plain run's.
    plain = tmp_path / "plain"
    assert train.main(["--cfg", SMOKE, "--nw", "0", "--output_dir", str(plain), "--set", "SOLVER.MAX_ITER", "4"]) == 0
    a = torch.load(str(plain / "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    b = torch.load(str(out / "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The curves of the run, and of two runs compared.
    plot = _tool("plot_curves")
    assert plot.main([str(out)]) == 0 and (out / "curves.png").stat().st_size > 10_000
    assert plot.main([str(out), str(out), "-o", str(tmp_path / "cmp.png")]) == 0 and (tmp_path / "cmp.png").exists()


@pytest.mark.slow
def test_demo_trains_with_evaluations_tests_and_plots_the_curves(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional plot extra (pinned in requirements-dev.txt)")
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "tools/demo.py", "--cfg", SMOKE, "--output_dir", str(out), "--eval_period", "1",
                        "--set", "TEST.DETECTIONS_PER_IM", "5"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = [rec for rec in read_metrics(str(out)) if rec["type"] == "eval"]
    assert [rec["iteration"] for rec in evals] == [1, 2]
    assert f"training curves in {out / 'curves.png'}" in r.stdout
    assert "1 run(s), 6 loss and 2 AP curve(s) (4 evaluation points)" in r.stdout  # bbox and segm AP, 2 points each
    final = json.loads((out / "eval" / "metrics.json").read_text())
    # The demo's final test and the training's last evaluation are one and the same evaluation.
    assert evals[-1]["segm/AP"] == pytest.approx(final["segm"]["AP"], abs=1e-9)
    assert not math.isnan(final["bbox"]["AR100"])
