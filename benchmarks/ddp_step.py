"""What two CPU training processes pay for being one run: the ``--auto`` recipe's step under torchrun, with the
gradients averaged in different ways, against processes that do not communicate at all.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/ddp_step.py --variant mixed --mode ddp
    (modes: none, barrier, flat, ddp, ddp_big, ddp_bf16; run each, alternate, repeat: the spread is several percent)

``none``: each process trains alone (the cost of two independent runs side by side); ``barrier``: a barrier per
step and no gradient exchange (the cost of waiting for the slower process); ``flat``: one all-reduce of all
gradients, flattened, before each optimizer step; ``ddp``: ``DistributedDataParallel`` as ``train_net`` uses it;
``ddp_big``: one 1000 MB bucket (the all-reduce after the backward instead of overlapping it); ``ddp_bf16``: DDP
with bf16-compressed gradients. Prints the mean step time over ``--steps`` steps after ``--warm`` ones (rank 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

MODES = ("none", "barrier", "flat", "ddp", "ddp_big", "ddp_bf16")


def main(argv=None) -> None:
    import torch
    import torch.distributed as dist

    from maskrcnn.cli.common import build_checked_dataset
    from maskrcnn.cli.train_net import parse_args, setup_cfg
    from maskrcnn.data.build import build_train_loader
    from maskrcnn.engine.solver import build_lr_scheduler, build_optimizer_from_cfg
    from maskrcnn.engine.speed import prepare_for_training
    from maskrcnn.engine.trainer import Trainer
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="mixed", help="synthetic family variant")
    p.add_argument("--mode", choices=MODES, default="ddp")
    p.add_argument("--warm", type=int, default=60)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = parse_args(["--auto", "--dataset", f"synthetic:{a.variant}:train", "--set", "SOLVER.MAX_ITER", "100000"])
    cfg = setup_cfg(args, world, log=lambda line: None)
    torch.manual_seed(0)
    dataset = build_checked_dataset(cfg, cfg.TRAIN.DATASETS, is_train=True)
    model = Generalized_RCNN(cfg)
    prepare_for_training(model, cfg)
    optimizer = build_optimizer_from_cfg(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)  # before optimizer.step is wrapped below
    loader = build_train_loader(dataset, ims_per_batch=cfg.TRAIN.IMS_PER_BATCH, num_workers=0,
                                aspect_grouping=cfg.TRAIN.ASPECT_GROUPING,
                                aspect_group_factor=cfg.TRAIN.ASPECT_RATIO_GROUP_FACTOR, seed=0, rank=rank,
                                world_size=world, flip=True, cache_mb=cfg.DATA_LOADER.CACHE_RAM_MB)
    trained = model
    if a.mode.startswith("ddp"):
        trained = torch.nn.parallel.DistributedDataParallel(model, **({"bucket_cap_mb": 1000} if a.mode == "ddp_big"
                                                                      else {}))
        if a.mode == "ddp_bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            trained.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif a.mode in ("barrier", "flat"):
        step, params = optimizer.step, [q for q in model.parameters() if q.requires_grad]

        def exchanged_step(*args_, **kwargs):
            if a.mode == "barrier":
                dist.barrier()
            else:
                grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat)
                flat /= world
                for q, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                    q.grad = g
            return step(*args_, **kwargs)

        optimizer.step = exchanged_step
    trainer = Trainer(trained, optimizer, scheduler, loader, max_iter=10 ** 6, amp=cfg.TRAIN.AMP,
                      device=torch.device("cpu"), clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM)
    for i in range(a.warm):
        trainer.iter = i
        trainer.run_step()
    dist.barrier()
    start = time.time()
    for i in range(a.warm, a.warm + a.steps):
        trainer.iter = i
        trainer.run_step()
    dist.barrier()
    if rank == 0:
        print(f"{a.variant} {a.mode} ({cfg.TRAIN.AMP or 'fp32'}, {world} processes): "
              f"{(time.time() - start) / a.steps * 1000:.1f} ms per step, mean of {a.steps} after {a.warm}")
    loader.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
