"""maskrcnn.utils.distributed in one process: the environment readers, the single-process fallbacks of every
collective, a real one-process gloo group, and the barrier's failure handling (peers simulated)."""
import logging

import pytest
import torch
import torch.distributed as dist

from maskrcnn.utils import distributed as du

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():  # a failed test must not leave its group to the next one
        dist.destroy_process_group()


def test_environment_readers(monkeypatch):
    assert (du.env_world_size(), du.env_rank(), du.env_local_rank()) == (1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (du.env_world_size(), du.env_rank(), du.env_local_rank()) == (4, 3, 1)
    monkeypatch.setenv("RANK", "")  # set but empty counts as unset
    assert du.env_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1.5")
    with pytest.raises(ValueError, match=r"environment variable LOCAL_RANK='1\.5' is not an integer"):
        du.env_local_rank()


def test_single_process_fallbacks():
    assert du.init_distributed() is False and not du.is_initialized()
    assert (du.get_world_size(), du.get_rank(), du.get_local_rank()) == (1, 0, 0)
    assert du.is_main_process()
    obj = {"a": [1, 2]}
    assert du.all_gather(obj) == [obj]
    assert du.broadcast_object(obj) is obj
    assert du.all_reduce_mean([1, 2.5, True]) == [1.0, 2.5, 1.0]
    assert all(type(v) is float for v in du.all_reduce_mean([1, 2]))
    assert du.all_reduce_mean([]) == []
    assert du.reduce_dict_mean({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    assert du.reduce_dict_mean({}) == {}
    assert du.all_true(True) is True and du.all_true(False) is False and du.all_true(1) is True
    du.synchronize()
    du.synchronize(timeout_s=0.01)
    du.destroy()  # nothing joined, nothing to leave
    assert du._device_for_collectives() == torch.device("cpu")


def test_local_rank_counts_only_inside_a_process_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert du.get_local_rank() == 0  # not launched as a group: this process is alone on its machine


def test_world_size_one_joins_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert du.init_distributed() is False and not dist.is_initialized()


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_incomplete_torchrun_environment_is_explained(monkeypatch, missing):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv(missing)
    with pytest.raises(RuntimeError, match=f"WORLD_SIZE=2 but {missing} is not set; start the processes with "
                                           f"torchrun"):
        du.init_distributed()


@pytest.mark.parametrize("rank", ["2", "-1"])
def test_rank_outside_the_world_is_explained(monkeypatch, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match=rf"RANK={rank} is outside \[0, WORLD_SIZE=2\)"):
        du.init_distributed()
    assert not dist.is_initialized()


def test_a_real_one_process_gloo_group(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert du.is_initialized() and du.get_world_size() == 1 and du.get_rank() == 0 and du.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert du.get_local_rank() == 0
    # Already in a group (e.g. joined by a caller): init_distributed reports it and joins nothing new.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert du.init_distributed() is True
    assert du._device_for_collectives() == torch.device("cpu")
    assert du.all_gather(3) == [3] and du.reduce_dict_mean({"x": 4.0}) == {"x": 4.0}
    du.synchronize(timeout_s=5)
    du.destroy()
    assert not du.is_initialized() and du.get_world_size() == 1


class _TwoPeers:
    """Pretends to be rank 0 of two processes in a gloo group; records which barrier ran."""

    def __init__(self, monkeypatch, fail=None):
        self.calls = []
        monkeypatch.setattr(du, "get_world_size", lambda: 2)
        monkeypatch.setattr(du.dist, "get_backend", lambda *a: "gloo")
        monkeypatch.setattr(du.dist, "barrier", self._barrier)
        monkeypatch.setattr(du.dist, "monitored_barrier", self._monitored)
        self.fail = fail

    def _barrier(self):
        self.calls.append("barrier")
        if self.fail:
            raise self.fail

    def _monitored(self, timeout):
        self.calls.append(("monitored", timeout.total_seconds()))
        if self.fail:
            raise self.fail


def test_barrier_uses_the_monitored_barrier_when_given_a_timeout(monkeypatch):
    peers = _TwoPeers(monkeypatch)
    du.synchronize()
    du.synchronize(timeout_s=30)
    assert peers.calls == ["barrier", ("monitored", 30.0)]


def test_a_failed_barrier_raises_or_is_logged(monkeypatch, caplog):
    _TwoPeers(monkeypatch, fail=RuntimeError("rank 1 did not arrive"))
    with pytest.raises(RuntimeError, match="rank 1 did not arrive"):
        du.synchronize(timeout_s=1)
    with caplog.at_level(logging.WARNING, logger=du.__name__):
        du.synchronize(timeout_s=1, raise_on_timeout=False)
    assert "barrier failed, going on without the other processes: rank 1 did not arrive" in caplog.text


def test_nccl_collectives_use_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(du, "is_initialized", lambda: True)
    monkeypatch.setattr(du.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(du.torch.cuda, "current_device", lambda: 3)
    assert du._device_for_collectives() == torch.device("cuda", 3)
    monkeypatch.setattr(du.dist, "get_backend", lambda *a: "gloo")
    assert du._device_for_collectives() == torch.device("cpu")

