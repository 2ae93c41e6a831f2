import io
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from maskrcnn.engine.launch import DistContext, create_ddp_model, run_then_shutdown, setup_distributed
from maskrcnn.utils import distributed as dist_utils
from maskrcnn.utils.env import collect_env_info, memory_mb, resolve_device, seed_all
from maskrcnn.utils.logger import Progress, SmoothedValue, format_seconds, setup_logger

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


# --- single-process behaviour of the distributed helpers --------------------------------------------------------
def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert not ctx.distributed and ctx.is_main
    assert dist_utils.get_world_size() == 1 and dist_utils.is_main_process()
    assert dist_utils.all_gather({"a": 1}) == [{"a": 1}]
    assert dist_utils.reduce_dict_mean({"x": 2.0, "y": 4}) == {"x": 2.0, "y": 4.0}
    assert dist_utils.all_true(True) and not dist_utils.all_true(False)
    assert dist_utils.broadcast_object([1, 2]) == [1, 2]
    dist_utils.synchronize()
    model = nn.Linear(2, 2)
    assert create_ddp_model(model, ctx) is model


def test_bad_torchrun_environment_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set.*torchrun"):
        dist_utils.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        dist_utils.env_world_size()


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", no_cuda=True) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device preference"):
        resolve_device("tpu")


def test_env_helpers():
    assert memory_mb(torch.device("cpu")) > 10
    info = collect_env_info()
    assert "torch: " in info and "torchvision: " in info
    seed_all(7)
    a = torch.rand(3)
    seed_all(7)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="non-negative"):
        seed_all(-1)


# --- logger -------------------------------------------------------------------------------------------------------
def test_smoothed_value_and_format_seconds():
    v = SmoothedValue(window=3)
    for x in (5.0, 1.0, 3.0, 100.0):
        v.update(x)
    assert v.median == 3.0 and v.latest == 100.0 and v.global_avg == pytest.approx(27.25)
    assert format_seconds(3725) == "1:02:05" and format_seconds(float("inf")) == "?"


def test_logger_console_on_rank0_only_and_file_per_rank(tmp_path):
    out = io.StringIO()
    lg = setup_logger("maskrcnn.test_logger", str(tmp_path), rank=0, stream=out)
    lg.info("hello")
    assert "hello" in out.getvalue() and "hello" in (tmp_path / "log.txt").read_text()
    out1 = io.StringIO()
    lg1 = setup_logger("maskrcnn.test_logger1", str(tmp_path), rank=1, stream=out1)
    lg1.info("from one")
    assert out1.getvalue() == "" and "from one" in (tmp_path / "log.txt.rank1").read_text()
    # Set up twice: still one console handler (no duplicated lines).
    lg = setup_logger("maskrcnn.test_logger", None, rank=0, stream=out)
    lg.info("once")
    assert out.getvalue().count("once") == 1
    for h in list(lg.handlers) + list(lg1.handlers):
        h.close()
    logging.getLogger("maskrcnn.test_logger").handlers.clear()
    logging.getLogger("maskrcnn.test_logger1").handlers.clear()


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_on_a_terminal_and_writes_lines_otherwise():
    tty = _Tty()
    list(Progress(range(5), desc="x", stream=tty))
    assert "\r" in tty.getvalue() and "5/5" in tty.getvalue() and tty.getvalue().endswith("\n")
    plain = io.StringIO()
    list(Progress(range(5), desc="x", stream=plain, log_every=1000))
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue()  # only the final line
    quiet = io.StringIO()
    list(Progress(range(3), stream=quiet, enabled=False))
    assert quiet.getvalue() == ""


# --- multi-process ------------------------------------------------------------------------------------------------
def _torchrun():
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(exe):
        pytest.fail(f"torchrun not found next to {sys.executable}")
    return exe


@pytest.mark.slow
def test_two_processes_with_batch_1_equal_one_process_with_batch_2(tmp_path):
    """DDP (gloo, CPU) averages the gradients of two per-image means in float32; one process takes the mean over
    both images. The sums differ in rounding only, so the weights agree to 1e-5 (observed: ~1e-8), not bitwise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    worker = os.path.join(HERE, "ddp_worker.py")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", worker, "--out",
                          str(tmp_path / "two" / "w.pth"), "--ims", "1", "--steps", "3"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, worker, "--out", str(tmp_path / "one" / "w.pth"), "--ims", "2",
                          "--steps", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    a = torch.load(str(tmp_path / "one" / "w.pth"), weights_only=True)
    b = torch.load(str(tmp_path / "two" / "w.pth"), weights_only=True)
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["image_ids"][0] == a["image_ids"][0]  # rank 0 took the first image of the shared stream
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-5)
    final = torch.load(str(tmp_path / "two" / "model_final.pth"), weights_only=True)
    assert len(final["rng_per_rank"]) == 2 and final["world_size"] == 2  # every rank's RNG state, for resuming
    for k, v in b["model"].items():
        assert torch.equal(final["model"][k], v), k


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_is_skipped_by_all_ranks(tmp_path):
    """Rank 1 alone sees a NaN loss (in the middle of gradient accumulation): both ranks skip the step together
    (no hang in the gradient all-reduce) and their weights stay identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "w.pth"
    r = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "ddp_worker.py"),
                        "--out", str(out), "--ims", "1", "--steps", "4", "--iter_size", "2", "--nan_on_rank1_at", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(str(out), weights_only=True)
    b = torch.load(f"{out}.rank1", weights_only=True)
    assert a["skipped"] == b["skipped"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_run_then_shutdown_maps_errors_to_exit_codes(capsys):
    class Usage(Exception):
        pass

    class Run(Exception):
        pass

    def failing(exc):
        def body():
            raise exc("bad thing in cfg.yaml")
        return body

    assert run_then_shutdown(lambda: 0, (Usage,), (Run,)) == 0
    assert run_then_shutdown(lambda: 3, (Usage,), (Run,)) == 3
    assert run_then_shutdown(failing(Usage), (Usage,), (Run,)) == 2
    assert run_then_shutdown(failing(Run), (Usage,), (Run,)) == 1
    assert capsys.readouterr().err.count("error: bad thing in cfg.yaml") == 2
    with pytest.raises(KeyError):
        run_then_shutdown(failing(KeyError), (Usage,), (Run,))
