"""Multi-process primitives on ``torch.distributed``; all of them also work, as no-ops, in a single process.

Processes are started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``); :func:`init_distributed` reads that environment.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size", "env_rank", "env_local_rank", "init_distributed", "is_initialized", "get_world_size",
    "get_rank", "get_local_rank", "is_main_process", "synchronize", "all_gather", "broadcast_object",
    "all_reduce_mean", "reduce_dict_mean", "all_true", "destroy",
]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` from the environment (0 when not launched by torchrun)."""
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when not launched by torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def init_distributed(backend: Optional[str] = None, use_cuda: bool = False, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by the torchrun environment; returns True when one was joined.

    A single process (``WORLD_SIZE`` unset or 1) joins nothing. ``backend`` defaults to ``nccl`` when
    ``use_cuda`` and ``gloo`` otherwise; with CUDA, the current device becomes ``LOCAL_RANK``.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return False
    if dist.is_initialized():
        return True
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set; start the processes with torchrun "
                               f"(torchrun --nproc_per_node N tools/train_net.py ...)")
    rank, local_rank = env_rank(), env_local_rank()
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_local_rank() -> int:
    return env_local_rank() if is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize(timeout_s: Optional[float] = None, raise_on_timeout: bool = True) -> None:
    """Barrier across all processes (no-op in a single process).

    ``timeout_s``: wait at most this long (gloo reports which ranks did not arrive); by default the process
    group's own timeout. With ``raise_on_timeout=False`` a failed barrier (timeout, peer gone) is logged instead.
    """
    if get_world_size() == 1:
        return
    try:
        if timeout_s is not None and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception as e:  # noqa: BLE001 - any transport failure means the same: a peer did not arrive
        if raise_on_timeout:
            raise
        logging.getLogger(__name__).warning("barrier failed, going on without the other processes: %s", e)


def _device_for_collectives() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU tensors.
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(obj: Any) -> List[Any]:
    """Every process's ``obj`` (any picklable value), in rank order; ``[obj]`` in a single process."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src``, on every process."""
    if get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_mean(values: List[float]) -> List[float]:
    """Element-wise mean over processes of a list of floats (in one collective)."""
    if get_world_size() == 1 or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / get_world_size()).tolist()


def reduce_dict_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Mean over processes of each value of a dict of floats; every process must pass the same keys."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_mean([values[k] for k in keys])))


def all_true(flag: bool) -> bool:
    """True when ``flag`` is True on every process (so that all of them take the same branch)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1)


def destroy() -> None:
    """Leave the process group (no-op when none was joined)."""
    if is_initialized():
        dist.destroy_process_group()
