"""Where one inference call's time goes: ``torch.profiler`` on ours (fp32 / bf16 / int8) or torchvision.

    python benchmarks/profile_call.py ours-bf16 [--score 0] [--rows 25] [--by-shape aten::copy_ aten::fill_ ...]
    python benchmarks/profile_call.py train-ours-fp32 [--quick]

The models and image are ``inference.py``'s (R-50-FPN with the same seeded weights, one 800x1066 photo): ``ours-fp32``
/ ``ours-bf16`` / ``ours-int8`` with the default inference speed features (``common.prepared``; int8 calibrated on
another photo), ``torchvision-bf16`` = torchvision under bf16 autocast + channels-last. After two warm-up calls,
three calls are timed and one is profiled: the table of operators by self CPU time, then for each ``--by-shape``
operator its calls grouped by input shape. A diagnostic of one process, not a ratio.

``train-*`` profiles one training step of ``train_step.py`` instead (forward with losses, backward, SGD step; batch
of 2 at 800x1066, ``--quick``: 480x640): ``train-ours-fp32`` / ``train-ours-bf16`` with the config's training speed
features, ``train-torchvision-cl`` / ``train-torchvision-bf16`` = torchvision channels-last / bf16 autocast +
channels-last. One warm-up step and two timed steps before the profiled one; denormals are flushed as in
``train_step.py``.

``--modules`` (ours-*): no profiler; the mean wall time of 5 calls per module (the model's children and
theirs), which the profiler distorts least for memory-bound work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

MODES = ("ours-fp32", "ours-bf16", "ours-int8", "torchvision-bf16")
TRAIN_MODES = {"train-ours-fp32": "ours-fp32", "train-ours-bf16": "ours-bf16",
               "train-torchvision-cl": common.TV_CL, "train-torchvision-bf16": common.TV_BF16}


def training_step(mode: str, quick: bool):
    """``train_step.py``'s step function for one of :data:`TRAIN_MODES`, with the config's speed features."""
    import train_step

    common.apply_flush_denormal(1)
    feats = train_step.features(argparse.Namespace(fold_bn=None, channels_last=None, no_speed=False))
    size = common.QUICK_IMAGE_SIZE if quick else common.IMAGE_SIZE
    _, step, _ = train_step.build(TRAIN_MODES[mode], size, feats)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("mode", choices=MODES + tuple(TRAIN_MODES))
    p.add_argument("--quick", action="store_true", help="train-*: 480x640 images")
    p.add_argument("--score", type=float, default=0.0, help="score threshold (0: 100 detections with masks)")
    p.add_argument("--rows", type=int, default=25)
    common.add_tune_malloc_arg(p)
    p.add_argument("--shapes", type=int, default=8, help="input shapes listed per --by-shape operator")
    p.add_argument("--by-shape", nargs="*", default=[], metavar="OP", help="operators to list by input shape")
    p.add_argument("--modules", action="store_true",
                   help="ours-*: instead of the profiler, wall time per module (the model's children and theirs) "
                        "over 5 calls, the rest of the call (pre/post-processing, mask pasting) as 'outside modules'")
    args = p.parse_args(argv)
    common.apply_tune_malloc(args.tune_malloc)
    if args.mode in TRAIN_MODES:
        return profile(training_step(args.mode, args.quick), args, warmup=1, timed=2)
    img = common.load_image()
    tv = common.build_torchvision(score_thresh=args.score, calib_image=img)
    if args.mode.startswith("ours"):
        mode = args.mode.split("-")[1]
        model = common.prepared(common.build_ours(tv, score_thresh=args.score), mode,
                                calib_images=[common.load_image(index=1)] if mode == "int8" else None)

        def call():
            return model([img])

        if args.modules:
            with torch.no_grad():
                return module_times(model, call, args.mode)
    else:
        tv = tv.to(memory_format=torch.channels_last)

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return tv([img])
    with torch.no_grad():
        return profile(call, args, warmup=2, timed=3)


def module_times(model, call, mode: str, calls: int = 5) -> int:
    """Mean wall time per call of each module down to depth 2 (forward hooks, no profiler: its own allocations
    and bookkeeping distort the memory-bound operators), after 3 warm-up calls."""
    spent: dict = {}
    stack: list = []
    names = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
    for name, module in model.named_modules():
        if name in names:
            module.register_forward_pre_hook(lambda m, a, n=name: stack.append((n, time.perf_counter())))
            module.register_forward_hook(lambda m, a, o, n=name: spent.__setitem__(
                n, spent.get(n, 0.0) + time.perf_counter() - stack.pop()[1]))
    for _ in range(3):
        call()
    spent.clear()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    total = (time.perf_counter() - start) / calls
    top = sum(v for k, v in spent.items() if "." not in k) / calls
    print(f"{mode}: {total * 1e3:.1f} ms per call, mean of {calls} (commit {common.git_commit()[:7]})")
    print("| module | ms per call | share |\n|---|---|---|")
    for name, t in sorted(spent.items(), key=lambda kv: names.index(kv[0])):
        print(f"| {'  ' * name.count('.')}{name} | {t / calls * 1e3:.1f} | {t / calls / total:.0%} |")
    print(f"| outside modules | {(total - top) * 1e3:.1f} | {(total - top) / total:.0%} |")
    return 0


def profile(call, args, warmup: int, timed: int) -> int:
    """Warm up, time ``timed`` calls, profile one more and print the tables."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        call()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=bool(args.by_shape)) as prof:
        call()
    print(f"{args.mode}: calls {', '.join(f'{t:.3f}' for t in times)} s (commit {common.git_commit()[:7]})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for op in args.by_shape:
        events = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == op),
                        key=lambda e: -e.self_cpu_time_total)
        for e in events[:args.shapes]:
            print(f"{op} {e.self_cpu_time_total / 1000:.1f} ms, {e.count} calls, input shapes {e.input_shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
