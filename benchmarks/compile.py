"""``TEST.COMPILE`` (``torch.compile`` of the body) measured: compile time, then speed against the eager model.

    python benchmarks/compile.py [--quick] [--modes fp32,bf16] [--repeats 5] [--threads N] [--json OUT]

Models: ours (R-50-FPN, torchvision's weights converted, ``common.build_ours``) with the default inference speed
features (``common.prepared``: folded BN, oneDNN fused blocks, channels-last; ``bf16``: plus ``TEST.AMP bf16``),
each eager and with ``compile_body=True`` (``maskrcnn.engine.speed.compile_conv_body``: inductor with freezing);
torchvision channels-last and bf16 autocast + channels-last for scale. One image (800x1066, ``--quick`` 480x640),
score threshold 0 (100 detections). The first call of each compiled model is timed on its own (the compilation);
then all models alternate for ``--repeats`` rounds after one warm-up round; medians, spread (min-max) and
compiled / eager per mode are printed. The compiled fp32 model's detections must equal the eager one's
(``common.compare_detections``), else the run exits with status 1.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="480x640 image")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from maskrcnn.engine.speed import compile_conv_body

    modes = [m for m in args.modes.split(",") if m]
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    info = common.machine_info()
    print(f"# TEST.COMPILE benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} "
          f"threads, load {info['load_avg_1min']}), torch {info['torch']}, capability {info['capability']}, image "
          f"{size[0]}x{size[1]}, commit {common.git_commit()}", flush=True)
    image = common.load_image(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=image, size=resize)
    ours = common.build_ours(tv, size=resize)
    fns = {k: v for k, v in common.torchvision_settings(tv, lambda m: m([image])).items() if k != common.TV_PLAIN}
    compile_s: Dict[str, float] = {}
    outputs: Dict[str, Any] = {}
    with torch.no_grad():
        for mode in modes:
            eager = common.prepared(copy.deepcopy(ours), mode)
            compiled = compile_conv_body(common.prepared(copy.deepcopy(ours), mode))
            start = time.perf_counter()
            outputs[f"ours-{mode}+compile"] = compiled([image])[0]
            compile_s[mode] = time.perf_counter() - start
            print(f"ours-{mode}: first call with TEST.COMPILE (compiles) {compile_s[mode]:.1f} s", flush=True)
            outputs[f"ours-{mode}"] = eager([image])[0]
            fns[f"ours-{mode}"] = lambda m=eager: m([image])
            fns[f"ours-{mode}+compile"] = lambda m=compiled: m([image])
        times = common.alternate(fns, repeats=args.repeats, warmup=1)
    medians = {n: common.median(t) for n, t in times.items()}
    print("\n| model | median | spread (min-max) | compile (first call) |\n|---|---|---|---|")
    for n, m in medians.items():
        mode = n[5:].split("+")[0] if n.startswith("ours") else None
        first = f"{compile_s[mode]:.1f} s" if n.endswith("+compile") else "-"
        print(f"| {n} | {common.fmt_s(m)} | {common.spread(times[n])} | {first} |")
    ratios = {f"ours-{m}+compile / ours-{m}": medians[f"ours-{m}+compile"] / medians[f"ours-{m}"] for m in modes}
    for m in modes:
        # Per round: the compiled and eager models ran in the same round.
        per_round = [a / b for a, b in zip(times[f"ours-{m}+compile"], times[f"ours-{m}"])]
        print(f"ours-{m}+compile / ours-{m}: {ratios[f'ours-{m}+compile / ours-{m}']:.3f} "
              f"(per round {min(per_round):.3f}-{max(per_round):.3f}); rounds to repay the compilation: "
              + (f"{compile_s[m] / (medians[f'ours-{m}'] - medians[f'ours-{m}+compile']):.0f}"
                 if medians[f"ours-{m}"] > medians[f"ours-{m}+compile"] else "never (not faster)"))
    check = None
    if "fp32" in modes:
        check = common.compare_detections(outputs["ours-fp32"], outputs["ours-fp32+compile"])
        print(f"detections ours-fp32+compile vs ours-fp32: {check['count_b']} vs {check['count_a']}, identical="
              f"{check['identical']} (max |d box| {check['max_box_diff']}, max |d score| {check['max_score_diff']})")
    result = {"benchmark": "compile", "commit": common.git_commit(), "machine": info, "image_size": list(size),
              "compile_s": compile_s, "times_s": times, "medians_s": medians, "ratios": ratios, "fp32_check": check}
    if args.json:
        common.write_json(args.json, result)
    return 0 if check is None or check["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
