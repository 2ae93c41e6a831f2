"""Process setup for the tools: one process, or one per device under ``torchrun``.

    torchrun --nproc_per_node N tools/train_net.py --cfg ...      # N processes on this machine
    torchrun --nnodes M --node_rank R --master_addr A --master_port P --nproc_per_node N tools/train_net.py ...

Each process trains on its own shard with ``TRAIN.IMS_PER_BATCH`` images; gradients are averaged by
``DistributedDataParallel`` (NCCL on CUDA, gloo on the CPU).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Tuple, Type

import torch
from torch import nn

from ..utils import distributed as dist_utils
from ..utils.env import resolve_device
from .preemption import EXIT_PREEMPTED

__all__ = ["DistContext", "setup_distributed", "create_ddp_model", "shutdown", "run_then_shutdown"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine, and the
    ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_preference: str = "auto", no_cuda: bool = False) -> DistContext:
    """Choose the device (cfg ``MODEL.DEVICE``; ``no_cuda`` forces the CPU) and join the torchrun process group
    when there is one (NCCL with CUDA, gloo on the CPU)."""
    local_rank = dist_utils.env_local_rank()
    device = resolve_device(device_preference, no_cuda=no_cuda, local_rank=local_rank)
    if dist_utils.env_world_size() > 1 and device.type == "cuda" and torch.cuda.device_count() <= local_rank:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                           f"visible; use --nproc_per_node <= {torch.cuda.device_count()} or --no_cuda")
    dist_utils.init_distributed(use_cuda=device.type == "cuda")
    return DistContext(rank=dist_utils.get_rank(), world_size=dist_utils.get_world_size(),
                       local_rank=local_rank if dist_utils.is_initialized() else 0, device=device)


def create_ddp_model(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when ``ctx`` is distributed, else ``model`` itself.

    ``find_unused_parameters`` stays False (faster) because every trainable parameter of Mask R-CNN receives a
    gradient at every iteration; set it for models with branches that can be skipped.
    """
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               output_device=device_ids[0] if device_ids else None,
                                               find_unused_parameters=find_unused_parameters)


def shutdown(wait_for_peers: bool = False, timeout_s: float = 300.0) -> None:
    """Leave the process group (no-op in a single process).

    ``wait_for_peers``: pass True after a successful run. All processes then meet at a barrier before tearing the
    group down, because with gloo a process that destroys its group while a peer is still in its last collective
    can make the peer's transport thread abort the peer ("terminate called without an active exception", exit
    signal 6). After an error, leave at once (the default): the peers may never arrive. The barrier gives up after
    ``timeout_s`` (a peer that died) and the group is left anyway.
    """
    if wait_for_peers:
        dist_utils.synchronize(timeout_s=timeout_s, raise_on_timeout=False)
    dist_utils.destroy()


def run_then_shutdown(body: Callable[[], int], usage_errors: Tuple[Type[BaseException], ...] = (),
                      run_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """A tool's main after :func:`setup_distributed`: the exit code of ``body()``, then leave the process group.

    ``usage_errors`` (bad config, dataset spec) exit with 2 and ``run_errors`` (unreadable checkpoint or data) with 1,
    each printed as one ``error: ...`` line without a traceback; anything else propagates. Processes meet at a
    barrier before leaving only when ``body`` returned 0 or 75 (preempted; see :func:`shutdown`).
    """
    clean_exit = False
    try:
        try:
            rc = body()
        except usage_errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except run_errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        # A preempted run (exit 75) stopped on every rank together after its checkpoint: leave together too.
        clean_exit = rc in (0, EXIT_PREEMPTED)
        return rc
    finally:
        shutdown(wait_for_peers=clean_exit)
