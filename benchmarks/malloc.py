"""Training-step time and page faults with glibc's default malloc settings against ``tune_malloc`` (``TUNE_MALLOC``).

    python tools/train_net.py --auto --dataset synthetic:thin:train --budget 10min --output_dir OUT
    python benchmarks/malloc.py --cfg OUT/config.yaml --load_ckpt OUT/model_final.pth \\
        --dataset synthetic:thin:train --threads 1 --rounds 3

Each round runs two child processes one after the other, alternating which goes first: the same model (the
trained weights, so that the RoI heads see as many foreground RoIs as late in training), the same data and
``--steps`` training steps after ``--warm`` untimed ones, with the learning rate at 1e-6 so the weights barely
move; one child calls :func:`maskrcnn.utils.tune_malloc` first. Each prints its median step time (data loading
excluded) and its minor page faults per step; the table gives both and the ratio tuned / default per round.
``--capped`` adds a third child with the setting of stop 26 (``tune_malloc(trim_threshold=1 GiB, map_large=True)``:
blocks above 32 MiB still mapped one by one), and the ratio tuned / capped; the children then rotate in each round.

``--code DIR`` imports ``maskrcnn`` from another checkout (e.g. an older commit, to time its step on the same
model); ``--only default`` runs only the children without ``tune_malloc`` (for code that predates it):

    for r in 1 2 3; do
        python benchmarks/malloc.py --code OLD_CHECKOUT --only default --rounds 1 --cfg ... --load_ckpt ... \\
            --dataset ...
        python benchmarks/malloc.py --only default --rounds 1 --cfg ... --load_ckpt ... --dataset ...
    done
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def child(args: argparse.Namespace) -> None:
    import resource

    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
    import torch

    import maskrcnn

    if args.code and not os.path.abspath(maskrcnn.__file__).startswith(os.path.abspath(args.code) + os.sep):
        raise SystemExit(f"--code {args.code}: maskrcnn was imported from {maskrcnn.__file__}")
    applied = False
    if args.child in ("tuned", "capped"):
        from maskrcnn.utils.malloc import tune_malloc

        # capped: the setting of stop 26 (blocks above 32 MiB still mapped, 1 GiB of free heap top kept).
        applied = tune_malloc() if args.child == "tuned" else tune_malloc(trim_threshold=1 << 30, map_large=True)
    torch.set_num_threads(args.threads)
    # The step is assembled here, not with a helper of the package, so that --code can time checkouts older
    # than any such helper (these imports exist in every commit since the Trainer).
    from maskrcnn.data.build import build_train_loader
    from maskrcnn.data.catalog import build_dataset
    from maskrcnn.engine.solver import build_lr_scheduler, build_optimizer_from_cfg
    from maskrcnn.engine.speed import prepare_for_training
    from maskrcnn.engine.trainer import Trainer
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.predictor import load_config
    from maskrcnn.utils.checkpoint import load_ckpt

    cfg = load_config(args.cfg)
    dataset = build_dataset(args.dataset, is_train=True)
    model = Generalized_RCNN(cfg)
    if args.load_ckpt:
        load_ckpt(model, args.load_ckpt)
    prepare_for_training(model, cfg)
    optimizer = build_optimizer_from_cfg(model, cfg)
    loader = build_train_loader(dataset, ims_per_batch=cfg.TRAIN.IMS_PER_BATCH, num_workers=0,
                                aspect_grouping=cfg.TRAIN.ASPECT_GROUPING,
                                aspect_group_factor=cfg.TRAIN.ASPECT_RATIO_GROUP_FACTOR, seed=cfg.RNG_SEED + 1,
                                flip=cfg.TRAIN.USE_FLIPPED, validate=False)
    total = args.warm + args.steps
    trainer = Trainer(model, optimizer, build_lr_scheduler(optimizer, cfg), loader, max_iter=total,
                      amp=cfg.TRAIN.AMP, device="cpu", clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM,
                      skip_nonfinite=True, max_consecutive_skips=total + 1)
    model.train()
    times, faults = [], 0
    try:
        for i in range(total):
            for group in optimizer.param_groups:
                group["lr"] = 1e-6
            trainer.iter = i
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            trainer.run_step()
            if i >= args.warm:
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                times.append(trainer.step_time - trainer.data_time)
    finally:
        loader.close()
    print(json.dumps({"applied": applied, "ms": statistics.median(times) * 1e3, "faults": faults / args.steps}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="a saved config (OUTPUT_DIR/config.yaml of a train_net run)")
    p.add_argument("--load_ckpt", default="", help="its weights (default: a fresh model, whose early steps are "
                   "cheaper than late ones)")
    p.add_argument("--dataset", required=True, help="training dataset spec, e.g. synthetic:thin:train")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--code", default="", help="import maskrcnn from this checkout (default: this one)")
    p.add_argument("--only", choices=("default", "tuned"), help="run only these children (no ratio)")
    p.add_argument("--capped", action="store_true", help="also a child with tune_malloc(trim_threshold=1 GiB, "
                   "map_large=True), the setting before blocks above 32 MiB were kept too (ratio tuned / capped)")
    p.add_argument("--child", choices=("default", "tuned", "capped"), help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for r in range(args.rounds):
        result = {}
        order = ("default", "tuned", "capped") if args.capped else ("default", "tuned")
        shift = r % len(order)
        modes = (args.only,) if args.only else order[shift:] + order[:shift]
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + argv
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result[mode] = json.loads(out.strip().splitlines()[-1])
        if args.only:
            one = result[args.only]
            print(f"round {r + 1}: {args.only} {one['ms']:.1f} ms/step, {one['faults']:.0f} faults/step "
                  f"({args.code or 'this checkout'})", flush=True)
            continue
        rows.append(result)
        d, t = result["default"], result["tuned"]
        capped = (f" | capped {result['capped']['ms']:.1f} ms/step, {result['capped']['faults']:.0f} faults/step, "
                  f"tuned / capped {t['ms'] / result['capped']['ms']:.3f}") if args.capped else ""
        print(f"round {r + 1}: default {d['ms']:.1f} ms/step, {d['faults']:.0f} faults/step | tuned "
              f"{t['ms']:.1f} ms/step, {t['faults']:.0f} faults/step (applied: {t['applied']}) | ratio "
              f"{t['ms'] / d['ms']:.3f}{capped}", flush=True)
    if args.only:
        return
    ratios = [row["tuned"]["ms"] / row["default"]["ms"] for row in rows]
    print(f"tuned / default step time: median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f} - "
          f"{max(ratios):.3f}), {args.threads} thread(s), {args.steps} steps per process")
    if args.capped:
        ratios = [row["tuned"]["ms"] / row["capped"]["ms"] for row in rows]
        print(f"tuned / capped step time: median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f} - "
              f"{max(ratios):.3f})")


if __name__ == "__main__":
    main()
