"""Training step speed: our R-50-FPN Mask R-CNN against torchvision's ``maskrcnn_resnet50_fpn``, same weights.

    python benchmarks/train_step.py [--quick] [--repeats 3] [--threads N] [--json OUT]
    python benchmarks/train_step.py --device cuda [--amp fp16|bf16] [--quick]    # GPU rows

One step = forward with losses, backward, ``torch.optim.SGD`` step (lr 1e-3, momentum 0.9, weight decay 1e-4 on
the trainable parameters), on a batch of 2 PennFudanPed images resized to 800x1066 (``--quick``: 480x640) with
4 synthetic boxes and masks each. The models are those of ``inference.py`` in training mode (stem and res2 frozen,
FrozenBN everywhere, 2000 proposals and 512 sampled RoIs per image); ours has ``maskrcnn.engine.speed.
prepare_for_training`` applied with the config defaults (``TRAIN.FUSE_FROZEN_BN``: FrozenBN folded into the
convolutions on the fly; ``TRAIN.CHANNELS_LAST``: channels-last weights and activations; gradients unchanged up to
float rounding; ``--fold-bn 0/1`` and ``--channels-last 0/1`` override them). The RNG is
reseeded before every step of either model, and each model steps on its own copy of the weights. Steps alternate
after a warm-up step each; medians and ``ratio = ours / torchvision`` are printed, with the peak memory of one step
measured in a fresh child process per model (``common.py``).

``--device cuda`` runs both models and the batch on the GPU (steps end with ``torch.cuda.synchronize()``; the peak
memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the step, in the same process).
``--amp fp16|bf16`` runs both models' forward under autocast, fp16 with a ``GradScaler`` as ``TRAIN.AMP`` does
(:mod:`maskrcnn.engine.amp`; fp16 needs CUDA).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

MODELS = ("torchvision", "ours")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="480x640 images")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--budget", type=float, default=240.0, help="stop timing rounds after this many seconds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-speed", action="store_true", help="ours without prepare_for_training (for comparison)")
    p.add_argument("--fold-bn", type=int, choices=(0, 1), default=None, help="override TRAIN.FUSE_FROZEN_BN")
    p.add_argument("--channels-last", type=int, choices=(0, 1), default=None, help="override TRAIN.CHANNELS_LAST")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models and batch live")
    p.add_argument("--amp", default="", choices=("", "bf16", "fp16"), help="autocast both models (fp16: + GradScaler)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child-memory", default=None, choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    from maskrcnn.engine.amp import check_amp

    try:
        check_amp(args.amp, args.device, "--amp")
    except ValueError as e:
        p.error(str(e))
    return args


def make_batch(size, device="cpu"):
    images = [common.load_image(size, index=i) for i in range(2)]
    targets = [common.synthetic_targets(im, num=4, seed=i) for i, im in enumerate(images)]
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def features(args) -> Dict[str, bool]:
    """``prepare_for_training`` arguments: the config defaults unless overridden on the command line."""
    from maskrcnn.config import get_cfg

    cfg = get_cfg()
    fold = cfg.TRAIN.FUSE_FROZEN_BN if args.fold_bn is None else bool(args.fold_bn)
    cl = cfg.TRAIN.CHANNELS_LAST if args.channels_last is None else bool(args.channels_last)
    return {"fold_bn": bool(fold) and not args.no_speed, "channels_last": bool(cl) and not args.no_speed}


def build(name: str, size, feats: Dict[str, bool], device: str = "cpu", amp: str = ""):
    """A model in training mode and a step function for it."""
    from maskrcnn.engine.amp import autocast_context
    from maskrcnn.engine.speed import prepare_for_training

    images, targets = make_batch(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=images[0], size=resize)
    images, targets = make_batch(size, device)
    if name == "torchvision":
        model = tv
    else:
        model = common.build_ours(tv, size=resize)
        del tv
        prepare_for_training(model, **feats)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device) if amp == "fp16" else None
    last: Dict[str, float] = {}

    def step():
        torch.manual_seed(0)
        opt.zero_grad(set_to_none=True)
        with autocast_context(amp, device):
            losses = model(images, targets)
        total = sum(v.float() for v in losses.values())
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        last.clear()
        last.update({k: float(v.detach()) for k, v in losses.items()})

    return model, step, last


def child_memory(args) -> None:
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    _, step, _ = build(args.child_memory, size, features(args), args.device, args.amp)
    step()
    gc.collect()
    peak = common.measure_peak_memory(step)
    print(json.dumps({"model": args.child_memory, "peak_bytes": peak}))


def run(args) -> Dict[str, Any]:
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    info = common.machine_info()
    print(f"# training-step benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} "
          f"threads, load {info['load_avg_1min']}), torch {info['torch']}, batch 2 x {size[0]}x{size[1]}, ours with "
          f"{features(args)}, device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda"
                                                       else "") + f", amp {args.amp or 'off'}")
    steps, losses = {}, {}
    for name in MODELS:
        _, steps[name], losses[name] = build(name, size, features(args), args.device, args.amp)
    times = common.alternate(steps, repeats=args.repeats, warmup=1, budget_s=args.budget)
    medians = {n: common.median(t) for n, t in times.items()}
    rows: List[Dict[str, Any]] = [{"model": n, "median_s": medians[n], "times_s": times[n],
                                   "ratio": medians[n] / medians["torchvision"], "last_losses": losses[n]}
                                  for n in MODELS]
    if args.device == "cuda" and not args.no_memory:
        for r in rows:  # both models stay allocated: the peak above the allocation before the step
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            steps[r["model"]]()
            r["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
    del steps
    gc.collect()
    if not args.no_memory and args.device == "cpu":
        for r in rows:
            child = ["--child-memory", r["model"]] + (["--quick"] if args.quick else []) + (
                ["--amp", args.amp] if args.amp else []) + (
                ["--no-speed"] if args.no_speed else []) + sum(
                ([f"--{k.replace('_', '-')}", str(int(v))] for k, v in features(args).items()), [])
            if args.threads:
                child += ["--threads", str(args.threads)]
            r["peak_memory_bytes"] = common.run_child("train_step.py", child)["peak_bytes"]
    print("\n| model | median step | ratio ours/tv | peak memory |")
    print("|---|---|---|---|")
    for r in rows:
        mem = common.fmt_mib(r["peak_memory_bytes"]) if "peak_memory_bytes" in r else "-"
        print(f"| {r['model']} | {common.fmt_s(r['median_s'])} | {r['ratio']:.3f} | {mem} |")
    print(f"steps per model: {len(times['torchvision'])} (alternated); times: "
          + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in ts) for n, ts in times.items()))
    for n in MODELS:
        print(f"{n} losses of its last step: " + ", ".join(f"{k} {v:.4f}" for k, v in losses[n].items()))
    return {"benchmark": "train_step", "machine": info, "image_size": list(size), "batch": 2, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "amp": args.amp,
            "speed_features": features(args), "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
