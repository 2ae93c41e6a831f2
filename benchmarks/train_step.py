"""Training step speed: our R-50-FPN Mask R-CNN against torchvision's ``maskrcnn_resnet50_fpn``, same weights.

    python benchmarks/train_step.py [--quick] [--repeats 5] [--threads N] [--json OUT]

One step = forward with losses, backward, ``torch.optim.SGD`` step (lr 1e-3, momentum 0.9, weight decay 1e-4 on
the trainable parameters), on a batch of 2 PennFudanPed images resized to 800x1066 (``--quick``: 480x640) with
4 synthetic boxes and masks each. The models are those of ``inference.py`` in training mode (stem and res2 frozen,
FrozenBN everywhere, 2000 proposals and 512 sampled RoIs per image); ours has ``maskrcnn.engine.speed.
prepare_for_training`` applied with the config defaults (``TRAIN.FUSE_FROZEN_BN``: FrozenBN folded into the
convolutions on the fly; ``TRAIN.CHANNELS_LAST``: channels-last weights and activations; ``TRAIN.WINOGRAD``: the
FPN's, RPN's and mask head's 3x3 convolutions and their gradients by Winograd in fp32; gradients unchanged up to
float rounding; ``--fold-bn 0/1``, ``--channels-last 0/1`` and ``--winograd 0/1`` override them). The RNG is
reseeded before every step of every run, and each run steps on its own copy of the weights. Runs
(:data:`MODELS`): torchvision plain, channels-last, bf16 autocast + channels-last; ours in fp32 and under bf16
autocast. Steps alternate after a warm-up step each (5 rounds by default); medians, the spread (min-max),
``ratio`` to torchvision plain (today's figure) and the fair ratios (ours fp32 / torchvision's best fp32 setting,
ours bf16 / torchvision bf16 + channels-last) are printed, with the peak memory of one step measured in a fresh
child process per run (``common.py``). The JSON records the commit.

How hard each goal is (``--no-flops`` skips this): the FLOPs of one step are counted once on torchvision's model
and on ours without speed features (:func:`count_step_flops`, direct convolutions), and the peak probes of
``inference.py`` (the 4096^3 matmul and the P2 convolution, fp32 and, with a bf16 run, bf16) are timed in every
round; each row gets its rate in those FLOPs per second and its fraction of the peak, and :func:`goal_lines` prints
the rate each of issue #14's training goals (:data:`GOALS`) needs. Float denormals are flushed to zero in
the whole process, for every run alike (``--flush-denormal 0`` keeps them): as ``tools/train_net.py`` does by
default (``FLUSH_DENORMAL``); without it the fp32 steps of both models grew about 4x over five steps on
an Intel Xeon (docs/benchmarks.md, "Denormals"), and the ratio measured which model met denormals first.
Likewise glibc malloc keeps freed memory for every run (``maskrcnn.utils.tune_malloc``, as ``TUNE_MALLOC`` does in
``tools/train_net.py``; ``--tune-malloc 0`` keeps glibc's defaults, under which every tensor above 32 MiB is
faulted in afresh at every step); the peak-memory children never tune it.
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

#: The timed runs: torchvision in its three eager settings, ours with the config's training speed features in fp32
#: and under bf16 autocast (``TRAIN.AMP bf16``: ``maskrcnn.engine.amp.autocast_context`` around the forward).
MODELS = common.TV_SETTINGS + ("ours-fp32", "ours-bf16")
BF16_RUNS = (common.TV_BF16, "ours-bf16")
#: Runs that ``--runs`` may name besides :data:`MODELS` (not run by default): ours in fp32 with ``TRAIN.WINOGRAD``
#: off, the A/B of the Winograd convolutions in one alternated run.
EXTRA_RUNS = ("ours-fp32-no-winograd",)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="480x640 images")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (>= 5 for the docs table)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--budget", type=float, default=None, help="stop timing rounds (at least 2) after this many seconds (default: never)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-speed", action="store_true", help="ours without prepare_for_training (for comparison)")
    p.add_argument("--fold-bn", type=int, choices=(0, 1), default=None, help="override TRAIN.FUSE_FROZEN_BN")
    p.add_argument("--channels-last", type=int, choices=(0, 1), default=None, help="override TRAIN.CHANNELS_LAST")
    p.add_argument("--winograd", type=int, choices=(0, 1), default=None, help="override TRAIN.WINOGRAD")
    p.add_argument("--runs", default=",".join(MODELS),
                   help="comma-separated subset of the runs to time (default: all); e.g. the bf16 runs apart with "
                        "fewer --repeats on a CPU without native bf16, where they are emulated and slow")
    common.add_flush_denormal_arg(p)
    common.add_tune_malloc_arg(p)
    p.add_argument("--no-flops", action="store_true",
                   help="skip the FLOP count of a step and the peak probes (no GFLOP/s, no fraction of the peak)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child-memory", default=None, choices=MODELS + EXTRA_RUNS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_batch(size):
    images = [common.load_image(size, index=i) for i in range(2)]
    targets = [common.synthetic_targets(im, num=4, seed=i) for i, im in enumerate(images)]
    return images, targets


def features(args) -> Dict[str, bool]:
    """``prepare_for_training`` arguments: the config defaults unless overridden on the command line."""
    from maskrcnn.config import get_cfg

    cfg = get_cfg()
    fold = cfg.TRAIN.FUSE_FROZEN_BN if args.fold_bn is None else bool(args.fold_bn)
    cl = cfg.TRAIN.CHANNELS_LAST if args.channels_last is None else bool(args.channels_last)
    wino = getattr(args, "winograd", None)
    wino = cfg.TRAIN.WINOGRAD if wino is None else bool(wino)
    return {"fold_bn": bool(fold) and not args.no_speed, "channels_last": bool(cl) and not args.no_speed,
            "winograd": bool(wino) and not args.no_speed}


def build(name: str, size, feats: Dict[str, bool]):
    """A model in training mode (one of :data:`MODELS`, its own copy of the weights) and a step function."""
    from maskrcnn.engine.amp import autocast_context
    from maskrcnn.engine.speed import prepare_for_training

    images, targets = make_batch(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=images[0], size=resize)
    if name == common.TV_PLAIN:
        model = tv
    elif name.startswith("torchvision"):
        model = tv.to(memory_format=torch.channels_last)
    else:
        model = common.build_ours(tv, size=resize)
        del tv
        prepare_for_training(model, **(dict(feats, winograd=False) if name == "ours-fp32-no-winograd" else feats))
    amp = "bf16" if name in BF16_RUNS else ""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    last: Dict[str, float] = {}

    def step():
        torch.manual_seed(0)
        opt.zero_grad(set_to_none=True)
        with autocast_context(amp, "cpu"):
            losses = model(images, targets)
        total = sum(losses.values())
        total.backward()
        opt.step()
        last.clear()
        last.update({k: float(v.detach()) for k, v in losses.items()})

    return model, step, last


def counting_faults(step, out: List[int]):
    """``step`` that appends the minor page faults (fresh pages the kernel mapped and zeroed) of each call to
    ``out``: what glibc's default malloc costs a step whose large tensors are unmapped when freed."""
    import resource

    def counted():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return counted


def child_memory(args) -> None:
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    _, step, _ = build(args.child_memory, size, features(args))
    step()
    gc.collect()
    peak = common.measure_peak_memory(step)
    print(json.dumps({"model": args.child_memory, "peak_bytes": peak}))


#: Issue #14's training goals: (ours, the competitor's runs (the fastest is taken), target ratio, peak dtype).
GOALS = (("ours-fp32", (common.TV_PLAIN, common.TV_CL), 0.60, "fp32"), ("ours-bf16", (common.TV_BF16,), 0.45, "bf16"))


def count_step_flops(runs: List[str], size) -> Dict[str, int]:
    """FLOPs of one training step (forward with losses and backward; the SGD update counts nothing) of torchvision's
    model and of ours without speed features, as ``FlopCounterMode`` counts them (convolutions directly, matmuls).
    The models with speed features are not counted: oneDNN's fused convolution ops escape the counter, and
    Winograd's products count fewer multiplications than the convolution they compute. Each count steps a model
    of its own."""
    out: Dict[str, int] = {}
    families = {"torchvision": [n for n in runs if n.startswith("torchvision")],
                "ours": [n for n in runs if n.startswith("ours")]}
    for family, members in families.items():
        if members:
            _, step, _ = build(common.TV_PLAIN if family == "torchvision" else "ours-fp32", size,
                               {"fold_bn": False, "channels_last": False, "winograd": False})
            out[family] = common.count_flops(step)
    return out


def goal_lines(medians: Dict[str, float], flops: Dict[str, int], peaks: Dict[str, Dict[str, float]]) -> List[str]:
    """For each goal of :data:`GOALS` measured here: the step time the target ratio allows and the rate (direct-
    convolution FLOPs per second) and fraction of the peak it needs."""
    lines = []
    for ours, competitors, target, dname in GOALS:
        comp = [c for c in competitors if c in medians]
        if ours not in medians or not comp or "torchvision" not in flops or dname not in peaks:
            continue
        best = min(comp, key=medians.get)
        allowed = target * medians[best]
        need = flops["torchvision"] / allowed / 1e9
        lines.append(f"goal {ours} <= {target:.2f} of {best} ({common.fmt_s(medians[best])}): a step of "
                     f"{common.fmt_s(allowed)}, {need:.0f} GFLOP/s in direct-convolution FLOPs, "
                     f"{100 * need / peaks[dname]['peak']:.0f}% of the {dname} peak ({peaks[dname]['peak']:.0f}); "
                     f"measured {medians[ours] / medians[best]:.3f}")
    return lines


def run(args) -> Dict[str, Any]:
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    info = common.machine_info()
    print(f"# training-step benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} "
          f"threads, load {info['load_avg_1min']}), torch {info['torch']}, batch 2 x {size[0]}x{size[1]}, ours with "
          f"{features(args)}, denormals {'flushed' if args.flush_denormal else 'kept'}, malloc "
          f"{'tuned' if args.tune_malloc else 'default'} (every run)")
    runs = [n for n in args.runs.split(",") if n]
    bad = [n for n in runs if n not in MODELS + EXTRA_RUNS]
    if bad or not runs:
        raise SystemExit(f"--runs: unknown or no run(s) {bad}; choose from {MODELS + EXTRA_RUNS}")
    flops = {} if args.no_flops else count_step_flops(runs, size)
    steps, losses, faults = {}, {}, {}
    for name in runs:
        _, step, losses[name] = build(name, size, features(args))
        steps[name] = counting_faults(step, faults.setdefault(name, []))
    peak_dtypes = {} if args.no_flops else {"fp32": torch.float32, **(
        {"bf16": torch.bfloat16} if any(n in BF16_RUNS for n in runs) else {})}
    conv_flops = common.add_peak_probes(steps, peak_dtypes)  # timed in every round, as the steps are
    times = common.alternate(steps, repeats=args.repeats, warmup=1, budget_s=args.budget)
    peaks = common.pop_peaks(times, conv_flops)
    medians = {n: common.median(t) for n, t in times.items()}
    tv = medians.get(common.TV_PLAIN)
    rows: List[Dict[str, Any]] = [{"model": n, "median_s": medians[n], "times_s": times[n],
                                   "ratio": medians[n] / tv if tv else None, "last_losses": losses[n],
                                   "page_faults": faults[n][1:]} for n in runs]
    tv_runs = [n for n in runs if n.startswith("torchvision")]
    fastest_tv = min(tv_runs, key=lambda n: medians[n]) if tv_runs else None
    ratios = common.fair_ratios(medians, "ours-fp32", "ours-bf16")
    for r in rows:
        fl = flops.get("ours" if r["model"].startswith("ours") else "torchvision")
        if fl:
            r["gflop"], r["gflop_per_s"] = fl / 1e9, fl / r["median_s"] / 1e9
            r["fraction_of_fp32_peak"] = r["gflop_per_s"] / peaks["fp32"]["peak"]
            if r["model"] in BF16_RUNS and "bf16" in peaks:
                r["fraction_of_bf16_peak"] = r["gflop_per_s"] / peaks["bf16"]["peak"]
    lines = goal_lines(medians, flops, peaks)
    del steps
    gc.collect()
    if not args.no_memory:
        for r in rows:
            child = ["--child-memory", r["model"], "--flush-denormal", str(args.flush_denormal)] + (
                ["--quick"] if args.quick else []) + (
                ["--no-speed"] if args.no_speed else []) + sum(
                ([f"--{k.replace('_', '-')}", str(int(v))] for k, v in features(args).items()), [])
            if args.threads:
                child += ["--threads", str(args.threads)]
            r["peak_memory_bytes"] = common.run_child("train_step.py", child)["peak_bytes"]
    if peaks:
        print("peak (best of all rounds; matmul / convolution): " + ", ".join(
            f"{n} {pk['peak']:.0f} ({pk['matmul']:.0f} / {pk['conv']:.0f}) GFLOP/s" for n, pk in peaks.items()))
    if flops:
        print("GFLOP of one step (FlopCounterMode on the models without speed features, direct convolutions; "
              "ours' Winograd convolutions multiply less, so its GFLOP/s can pass the peak): " + ", ".join(
                  f"{k} {v / 1e9:.1f}" for k, v in flops.items()))
    print("\n| model | median step | spread (min-max) | ratio to tv plain | GFLOP/s | of fp32 peak | of bf16 peak "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = common.fmt_mib(r["peak_memory_bytes"]) if "peak_memory_bytes" in r else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        rate = f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else "-"
        f32 = f"{100 * r['fraction_of_fp32_peak']:.0f}%" if "fraction_of_fp32_peak" in r else "-"
        b16 = f"{100 * r['fraction_of_bf16_peak']:.0f}%" if "fraction_of_bf16_peak" in r else "-"
        print(f"| {r['model']} | {common.fmt_s(r['median_s'])} | {common.spread(r['times_s'])} | {ratio} | {rate} "
              f"| {f32} | {b16} | {mem} |")
    for line in lines:
        print(line)
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    if fastest_tv:
        print(f"torchvision's fastest setting here: {fastest_tv} ({common.fmt_s(medians[fastest_tv])})")
    print(f"steps per model: {len(times[runs[0]])} (alternated); times: "
          + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in ts) for n, ts in times.items()))
    print("minor page faults per timed step: " + "; ".join(
        f"{n} " + ", ".join(str(f) for f in faults[n][1:]) for n in runs))
    for n in runs:
        print(f"{n} losses of its last step: " + ", ".join(f"{k} {v:.4f}" for k, v in losses[n].items()))
    return {"benchmark": "train_step", "commit": common.git_commit(), "machine": info, "image_size": list(size),
            "batch": 2, "repeats": args.repeats, "speed_features": features(args),
            "flush_denormal": bool(args.flush_denormal), "tune_malloc": bool(args.tune_malloc), "runs": runs,
            "fastest_torchvision": fastest_tv, "step_flops": flops, "peaks_gflops": peaks,
            "rows": rows, "ratios": ratios, "goal_lines": lines}


def main(argv=None) -> int:
    args = parse_args(argv)
    common.apply_flush_denormal(args.flush_denormal)  # first: the thread pool inherits it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    common.apply_tune_malloc(args.tune_malloc)
    result = run(args)
    if args.json:
        common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
