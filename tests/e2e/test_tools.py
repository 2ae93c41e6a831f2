"""Command lines of tools/train_net.py and tools/test_net.py on the tiny synthetic config (real model).

The slow tests train the real Mask R-CNN for a few iterations at 64 px: resuming (in-process and after
``kill -9``) must reproduce the uninterrupted run's weights bitwise on the CPU.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
DEMO = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(args, timeout=600):
    return subprocess.run([sys.executable] + args, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- fast: bad input fails before any work -------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--cfg", "no/such/config.yaml"], "config file not found"),
    (["--cfg", SMOKE, "--set", "SOLVER.BASE_LR", "-1"], "SOLVER.BASE_LR = -1.0 is not allowed"),
    (["--cfg", SMOKE, "--set", "SOLVER.NO_SUCH_KEY", "1"], "unknown config key 'SOLVER.NO_SUCH_KEY'"),
    (["--cfg", SMOKE, "--set", "TRAIN.DATASETS", "[]"], "no training dataset"),
])
def test_train_net_config_errors_exit_2_without_traceback(argv, needle, capsys, tmp_path):
    rc = _tool("train_net").main(argv + ["--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("config error: ") and "Traceback" not in err
    assert needle in err
    assert os.listdir(tmp_path) == []  # nothing was started


def test_batch_not_divisible_by_processes_is_a_config_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # read before any process group is joined
    rc = _tool("train_net").main(["--cfg", SMOKE, "--bs", "3", "--output_dir", str(tmp_path)])
    assert rc == 2
    assert "--bs 3: the total batch must be a positive multiple of the number of processes (2)" in \
        capsys.readouterr().err


def test_batch_size_and_lr_flags_apply_the_scaling_rule(capsys):
    train = _tool("train_net")
    args = train.parse_args(["--cfg", SMOKE, "--bs", "8", "--iter_size", "2"])
    cfg = train.setup_cfg(args, world_size=1, log=print)
    assert cfg.TRAIN.IMS_PER_BATCH == 8 and cfg.is_frozen()
    # The smoke file trains 2 images per step on 1 GPU; 16 per step is 8x: lr x8, iterations / 8 (at least 1).
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.08) and cfg.SOLVER.MAX_ITER == 1
    assert "linear scaling rule" in capsys.readouterr().out
    args = train.parse_args(["--cfg", SMOKE, "--bs", "8", "--lr", "0.003"])
    assert train.setup_cfg(args, world_size=2, log=print).SOLVER.BASE_LR == 0.003


def test_test_net_config_and_checkpoint_errors(capsys, tmp_path):
    tool = _tool("test_net")
    assert tool.main(["--cfg", SMOKE, "--load_ckpt", "x.pth", "--set", "TEST.NMS", "2"]) == 2
    assert "TEST.NMS = 2.0 is not allowed" in capsys.readouterr().err
    assert tool.main(["--cfg", SMOKE, "--load_ckpt", str(tmp_path / "missing.pth")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\0" * 100)
    assert tool.main(["--cfg", SMOKE, "--load_ckpt", str(bad), "--output_dir", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "bad.pth is truncated or corrupt" in err and "Traceback" not in err


def test_quick_schedule_configs_are_valid():
    from maskrcnn.config import assert_and_infer_cfg, get_cfg
    for path in (DEMO, SMOKE):
        cfg = get_cfg()
        cfg.merge_from_file(path)
        assert_and_infer_cfg(cfg)
        assert cfg.MODEL.NUM_CLASSES == 4 and cfg.RESNETS.FREEZE_AT == 0 and cfg.RESNETS.NORM != "FrozenBN"


# --- slow: real training -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_then_test_command_lines(tmp_path):
    out = tmp_path / "train"
    r = _run(["tools/train_net.py", "--cfg", SMOKE, "--output_dir", str(out), "--nw", "0"])
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint", "config.yaml", "log.txt"):
        assert (out / name).exists(), name
    log = (out / "log.txt").read_text()
    assert "iter 2/2" in log and "loss_mask" in log and "s/it" in log and "eta" in log
    ck = torch.load(str(out / "model_final.pth"), weights_only=True)
    assert ck["iteration"] == 2 and {"model", "optimizer", "scheduler", "cfg", "rng"} <= set(ck)

    test_out = tmp_path / "test"
    args = ["tools/test_net.py", "--cfg", SMOKE, "--load_ckpt", str(out / "model_final.pth"), "--dataset",
            "synthetic:val", "--output_dir", str(test_out), "--range", "0", "6", "--vis"]
    r = _run(args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in r.stdout
    assert "per-category segm AP" in r.stdout
    metrics = json.loads((test_out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["segm"]) == ({"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                                     "ARl"} | {f"AP-{c}" for c in ("rectangle", "ellipse", "triangle")})
    bbox = json.loads((test_out / "bbox_results.json").read_text())
    assert {d["image_id"] for d in bbox} <= set(range(6))
    assert len(os.listdir(test_out / "vis")) == 6
    # Continuing a finished run redoes nothing.
    r = _run(args + ["--resume"])
    assert r.returncode == 0 and "6 of 6 images already done, 0 to run" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_bf16_training_and_inference_through_the_tools(tmp_path):
    """TRAIN.AMP / TEST.AMP bf16 together with the speed switches (channels-last; BN folded at inference: the
    config trains BatchNorm, so TRAIN.FUSE_FROZEN_BN is off)."""
    out = tmp_path / "train"
    r = _run(["tools/train_net.py", "--cfg", SMOKE, "--output_dir", str(out), "--nw", "0", "--set", "TRAIN.AMP",
              "bf16"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "iter 2/2" in (out / "log.txt").read_text()
    r = _run(["tools/test_net.py", "--cfg", SMOKE, "--load_ckpt", str(out / "model_final.pth"), "--dataset",
              "synthetic:val", "--output_dir", str(tmp_path / "test"), "--range", "0", "4", "--set", "TEST.AMP",
              "bf16"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "amp bf16" in r.stdout + r.stderr  # prepare_for_inference's line in the log
    assert set(json.loads((tmp_path / "test" / "metrics.json").read_text())) == {"bbox", "segm"}


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    train = _tool("train_net")
    base = ["--cfg", SMOKE, "--nw", "0", "--set", "TRAIN.SNAPSHOT_ITERS", "2"]
    assert train.main(base + ["--output_dir", str(tmp_path / "full"), "--set", "SOLVER.MAX_ITER", "4"]) == 0
    split = str(tmp_path / "split")
    assert train.main(base + ["--output_dir", split, "--set", "SOLVER.MAX_ITER", "2"]) == 0
    assert train.main(base + ["--output_dir", split, "--resume", "--set", "SOLVER.MAX_ITER", "4"]) == 0
    assert "resuming from" in open(os.path.join(split, "log.txt")).read()
    _assert_same_weights(_weights(str(tmp_path / "full" / "model_final.pth")),
                         _weights(os.path.join(split, "model_final.pth")))


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    args = ["tools/train_net.py", "--cfg", SMOKE, "--nw", "0", "--set", "SOLVER.MAX_ITER", "8",
            "TRAIN.SNAPSHOT_ITERS", "2"]
    full = _run(args + ["--output_dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stdout + full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable] + args + ["--output_dir", str(out)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "model_0000002.pth").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "model_final.pth").exists(), "the run finished before it could be killed"
    r = _run(args + ["--output_dir", str(out), "--resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_same_weights(_weights(str(tmp_path / "full" / "model_final.pth")), _weights(str(out / "model_final.pth")))


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    r = _run(["tools/train_net.py", "--cfg", SMOKE, "--nw", "0", "--output_dir", str(tmp_path), "--set",
              "SOLVER.MAX_ITER", "8", "SOLVER.BASE_LR", "1e12", "SOLVER.WARM_UP_ITERS", "0"])
    assert r.returncode == 1, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "non-finite loss at iteration" in text and "image ids of the batch" in text and "loss_cls=" in text
    assert "Last good checkpoint: " in text and "Traceback" not in text
    assert not (tmp_path / "model_final.pth").exists()
    last = (tmp_path / "last_checkpoint").read_text()
    torch.load(str(tmp_path / last), weights_only=True)  # the last good checkpoint is intact


@pytest.mark.slow
def test_torchrun_two_processes_train_and_test(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "tools/train_net.py", "--cfg", SMOKE,
                        "--nw", "0", "--output_dir", str(out), "--set", "TRAIN.IMS_PER_BATCH", "1",
                        "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_BEST", "segm/AP"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(str(out / "model_final.pth"), weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert "2 process(es) x 1 images" in (out / "log.txt").read_text()
    # Evaluation during training ran on both processes (64 val images, each its shard) and rank 0 alone wrote.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(rec["type"], rec["iteration"]) for rec in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert records[2]["segm/AR100"] >= 0 and "segm/AP-ellipse" in records[2]
    assert "evaluation at iteration 2" in (out / "log.txt").read_text()
    assert torch.load(str(out / "model_best.pth"), weights_only=True)["iteration"] == 2
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "tools/test_net.py", "--cfg", SMOKE,
                        "--load_ckpt", str(out / "model_final.pth"), "--range", "0", "5", "--output_dir",
                        str(tmp_path / "test")], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "test" / "metrics.json").exists()
    parts = sorted(os.listdir(tmp_path / "test" / "inference"))
    assert parts == ["partial_rank0.jsonl", "partial_rank1.jsonl"]
    n = sum(len(open(tmp_path / "test" / "inference" / p).read().splitlines()) - 1 for p in parts)
    assert n == 5  # the images were split between the two processes and gathered
