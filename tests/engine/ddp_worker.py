"""Trains the ToyDetector for a few iterations with the engine (DDP when started by torchrun) and saves the weights.

    torchrun --nproc_per_node 2 tests/engine/ddp_worker.py --out W.pth --ims 1 --steps 3
    python tests/engine/ddp_worker.py --out W.pth --ims 2 --steps 3
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine_toys import ToyDetector  # noqa: E402

from maskrcnn.data.build import build_train_loader  # noqa: E402
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset  # noqa: E402
from maskrcnn.engine.hooks import LogHook, PeriodicCheckpointer  # noqa: E402
from maskrcnn.engine.launch import create_ddp_model, setup_distributed, shutdown  # noqa: E402
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer  # noqa: E402
from maskrcnn.engine.trainer import Trainer  # noqa: E402
from maskrcnn.utils.checkpoint import Checkpointer  # noqa: E402
from maskrcnn.utils.logger import setup_logger  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ims", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--iter_size", type=int, default=1)
    p.add_argument("--nan_on_rank1_at", type=int, default=None,
                   help="make rank 1's loss NaN at this forward call and skip non-finite steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = setup_distributed("cpu")
    ok = False
    try:
        torch.manual_seed(0)
        nan_at = [args.nan_on_rank1_at] if args.nan_on_rank1_at is not None and ctx.rank == 1 else []
        model = ToyDetector(width=8, nan_at=nan_at)
        optimizer = build_optimizer(model, base_lr=0.05)
        scheduler = WarmupMultiStepLR(optimizer, LRSchedule(0.05, steps=(0, 2), warmup_iters=1))
        ddp = create_ddp_model(model, ctx)
        dataset = SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)
        loader = build_train_loader(dataset, ims_per_batch=args.ims, aspect_grouping=False, seed=5, rank=ctx.rank,
                                    world_size=ctx.world_size)
        ck = Checkpointer(model, os.path.dirname(args.out), optimizer, scheduler, save_to_disk=ctx.is_main)
        logger = setup_logger("ddp_worker", rank=ctx.rank)
        trainer = Trainer(ddp, optimizer, scheduler, loader, max_iter=args.steps, iter_size=args.iter_size,
                          skip_nonfinite=args.nan_on_rank1_at is not None,
                          hooks=[LogHook(1, logger), PeriodicCheckpointer(ck, period=100)])
        trainer.train()
        loader.close()
        result = {"model": model.state_dict(), "image_ids": trainer.image_ids, "world_size": ctx.world_size,
                  "skipped": trainer.skipped_steps}
        torch.save(result, args.out if ctx.is_main else f"{args.out}.rank{ctx.rank}")
        ok = True
    finally:
        shutdown(wait_for_peers=ok)


if __name__ == "__main__":
    main()
