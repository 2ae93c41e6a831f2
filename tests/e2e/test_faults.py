"""Faults of a shared cluster, on tools/train_net.py with the real (tiny) Mask R-CNN: preemption signals, a corrupt
newest checkpoint, a full disk while writing one, and a rank killed with SIGKILL in a two-node torchrun run.

What each fault does and the log lines it prints are in docs/reliability.md. The uninterrupted run that the resumed
ones must reproduce bitwise is trained once per module (8 iterations, loader workers on, as on a cluster).
"""
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml")
TRAIN = ["tools/train_net.py", "--cfg", SMOKE, "--nw", "2", "--set", "TRAIN.SNAPSHOT_ITERS", "4"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _train(out, max_iter, *extra, preexec_fn=None):
    return subprocess.run([sys.executable] + TRAIN + ["SOLVER.MAX_ITER", str(max_iter), "--output_dir", str(out)]
                          + list(extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec_fn)


def _weights(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _wait_for(path, needle, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and needle in open(path, encoding="utf-8").read():
            return
        time.sleep(0.05)
    pytest.fail(f"{needle!r} did not appear in {path} (process exit status {proc.poll()})")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run: 8 iterations, snapshots at 4 and final at 8."""
    out = tmp_path_factory.mktemp("full")
    r = _train(out, 8)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_75_and_resume_is_bitwise(tmp_path, full_run):
    out = tmp_path / "preempted"
    # Its own session: the signal goes to every process of the run (the loader workers too), as a scheduler does.
    proc = subprocess.Popen([sys.executable] + TRAIN + ["SOLVER.MAX_ITER", "8", "--output_dir", str(out)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for(str(out / "log.txt"), "iter 2/8", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, text
    m = re.search(r"received SIGTERM \(at [0-9:]+\): writing a checkpoint after iteration (\d) and stopping", text)
    assert m, text
    done = int(m.group(1))
    assert 2 <= done < 8
    ckpt = out / f"model_{done:07d}.pth"
    assert f"saved checkpoint {ckpt} (iteration {done})" in text
    assert f"preempted by SIGTERM after {done} of 8 iterations; checkpoint {ckpt}; continue with --resume; " \
           f"exit status 75" in text
    assert "Traceback" not in text and (out / "last_checkpoint").read_text() == ckpt.name

    r = _train(out, 8, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {ckpt} at iteration {done}" in r.stdout + r.stderr
    _assert_same_weights(_weights(full_run / "model_final.pth"), _weights(out / "model_final.pth"))
    print("\n" + "\n".join(line for line in text.splitlines() if "preempted by" in line or "received SIGTERM" in line))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resume_falls_back_to_the_previous_one(tmp_path, full_run):
    out = tmp_path / "corrupt"
    r = _train(out, 6)  # model_0000004.pth, then model_final.pth at iteration 6 (the newest)
    assert r.returncode == 0, r.stdout + r.stderr
    newest = out / "model_final.pth"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2  # inside the tensor data: torch.load alone would not notice
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    newest.write_bytes(bytes(data))

    r = _train(out, 8, "--resume")
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert re.search(rf"cannot resume from {re.escape(str(newest))}, trying an older checkpoint: checkpoint "
                     rf"{re.escape(str(newest))} is truncated or corrupt: its SHA-256 is [0-9a-f]{{16}}\.\.\. but "
                     rf"{re.escape(str(newest))}.sha256 recorded [0-9a-f]{{16}}\.\.\. when it was written", text), text
    assert f"resuming from {out / 'model_0000004.pth'} at iteration 4" in text
    _assert_same_weights(_weights(full_run / "model_final.pth"), _weights(newest))
    print("\n" + "\n".join(line for line in text.splitlines() if "cannot resume from" in line))


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_names_the_path(tmp_path, full_run):
    out = tmp_path / "full_disk"
    shutil.copytree(full_run, out)  # model_final.pth at iteration 8: resume to 12, then its overwrite fails
    size = (out / "model_final.pth").stat().st_size
    limit = 8 << 20  # larger than any log line, smaller than a checkpoint (about 90 MB)
    assert size > limit

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = _train(out, 12, "--resume", preexec_fn=limit_file_size)
    final = out / "model_final.pth"
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert "Traceback" not in err
    assert (f"error: could not write checkpoint {final}: File too large; the previous checkpoint at {final} is "
            f"intact (the partial temporary file was removed). the newest complete checkpoint, {final}, is intact "
            f"and --resume continues from it. Fix: free space on the disk holding {out}") in err, err
    assert "`ulimit -f`" in err
    assert sorted(os.listdir(out)) == sorted(os.listdir(full_run))  # no temporary file left
    kept = torch.load(str(final), weights_only=True)
    assert kept["iteration"] == 8 and final.stat().st_size == size
    from maskrcnn.utils.checkpoint_integrity import verify_checksum
    assert verify_checksum(str(final)) is True  # the old checksum still matches the old file
    print("\n" + err.strip())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rank_killed_with_sigkill_makes_the_other_rank_exit_naming_it(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "two_nodes"
    port = _free_port()
    argv = ["tools/train_net.py", "--cfg", SMOKE, "--nw", "0", "--output_dir", str(out), "--set",
            "SOLVER.MAX_ITER", "200", "TRAIN.SNAPSHOT_ITERS", "1000", "TRAIN.IMS_PER_BATCH", "1",
            "TRAIN.LOST_RANK_TIMEOUT", "10"]
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                               "faults"] + argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        _wait_for(str(out / "log.txt"), "iter 2/200", nodes[0])
        rank1_log = (out / "log.txt.rank1").read_text()
        victim = int(re.search(r"rank 1 of 2 \(host [^,]+, pid (\d+)\): heartbeat every", rank1_log).group(1))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        outputs = [p.communicate(timeout=120)[0] for p in nodes]
        elapsed = time.time() - killed_at
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode != 0 for p in nodes), outputs
    assert elapsed < 60, f"the run took {elapsed:.0f} s to stop after the kill"
    log0 = (out / "log.txt").read_text()
    assert re.search(rf"lost a process: rank 1 \(host [^,]+, pid {victim}\) stopped sending heartbeats: killed, out "
                     rf"of memory or its node failed; see that rank's log and the scheduler's; rank 0 stops \(its "
                     rf"collective failed with: ", log0), log0[-3000:]
    assert re.search(rf"error: lost a process: rank 1 \(host [^,]+, pid {victim}\)", "".join(outputs))
    print("\n" + "\n".join(line for line in "".join(outputs).splitlines() if "lost a process" in line))
    print(f"two nodes stopped {elapsed:.1f} s after rank 1 was killed")
