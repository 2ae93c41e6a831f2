"""Two "nodes" on this machine: two `torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1` launches meeting at a
c10d rendezvous on 127.0.0.1, as on a cluster (docs/getting_started.md, "Several nodes and SLURM"). They train the
synthetic set for a few iterations with the engine (tests/engine/ddp_worker.py: the ToyDetector, DDP over gloo) and
must end with the weights of one process taking the same total batch, to the tolerance of
tests/engine/test_launch.py::test_two_processes_with_batch_1_equal_one_process_with_batch_2.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "engine", "ddp_worker.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_equal_one_process_with_the_same_total_batch(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    assert os.path.exists(torchrun), f"torchrun not found next to {sys.executable}"
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    port = _free_port()
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                               "two_nodes", WORKER, "--out", str(tmp_path / "two" / "w.pth"), "--ims", "1",
                               "--steps", "3"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outputs
    one = subprocess.run([sys.executable, WORKER, "--out", str(tmp_path / "one" / "w.pth"), "--ims", "2", "--steps",
                          "3"], env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr

    a = torch.load(str(tmp_path / "one" / "w.pth"), weights_only=True)
    b = torch.load(str(tmp_path / "two" / "w.pth"), weights_only=True)
    b1 = torch.load(str(tmp_path / "two" / "w.pth.rank1"), weights_only=True)
    assert a["world_size"] == 1 and b["world_size"] == b1["world_size"] == 2
    assert b["image_ids"][0] == a["image_ids"][0]  # node 0 took the first image of the shared stream
    diff = max((b["model"][k] - a["model"][k]).abs().max().item() for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-5)
        assert torch.equal(b["model"][k], b1["model"][k]), k  # both nodes hold the same weights
    final = torch.load(str(tmp_path / "two" / "model_final.pth"), weights_only=True)
    assert final["world_size"] == 2 and len(final["rng_per_rank"]) == 2
    print(f"two nodes vs one process with the same total batch: max weight difference {diff:.2e}")
