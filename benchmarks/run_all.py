"""Run every model benchmark, write one JSON of the results and draw the ratio chart.

    python benchmarks/run_all.py [--quick] [--threads N] [--out output/benchmarks/results.json]
                                 [--png docs/benchmarks_ratios.png] [--skip inference|train_step ...]
                                 [--ap-ckpt CKPT [--ap-cfg CFG] [--ap-datasets synthetic:val,synthetic:train]]

Each benchmark runs in its own process (``inference.py``: fp32, bf16 and int8 inference; ``train_step.py``: one
SGD step on a batch of 2, fp32 and bf16), one after the other, so that neither sees the other's memory.
``--quick`` uses 480x640 images and fewer repeats (a smoke run, a few minutes on two cores; the full run took 16
minutes on a 2-core AVX512-BF16 machine). The JSON holds every benchmark's full output under its name;
``plot.py`` turns it into ``docs/benchmarks_ratios.png`` and prints the markdown table of ``docs/benchmarks.md``
(every goal ratio of issue #14 with its spread over the rounds). With ``--ap-ckpt`` (a model trained with
``tools/train_net.py`` on the synthetic set) the bf16 and int8 AP checks against fp32 (``inference.py ap --modes
bf16,int8``) run too, on each of ``--ap-datasets``: synthetic:val (64 images: one detection more or less moves AP
by about half a point) and, as a larger fidelity check of the same model, its 512 training images. The ops
micro-benchmarks (``benchmarks/ops.py``) are separate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHMARKS = ("inference", "train_step")


def _save(results: dict, path: str) -> None:
    """Write what has been measured so far (also when a later benchmark fails: nothing measured is lost)."""
    if not results:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}" + ("" if "train_step" in results and "inference" in results else " (partial)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller images, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every benchmark")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "benchmarks", "results.json"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "benchmarks_ratios.png"))
    p.add_argument("--skip", nargs="*", default=[], choices=BENCHMARKS)
    p.add_argument("--ap-ckpt", default=None, help="trained checkpoint: also run the bf16/int8 AP checks")
    p.add_argument("--ap-datasets", default="synthetic:val,synthetic:train",
                   help="comma-separated dataset specs of the AP checks")
    p.add_argument("--ap-cfg", default=os.path.join(ROOT, "configs", "quick_schedules",
                                                    "e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml"),
                   help="config of --ap-ckpt (default: the synthetic quick schedule)")
    args = p.parse_args(argv)

    results = {}
    common_args = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCHMARKS:
            if name in args.skip:
                continue
            out = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), "--json", out] + common_args
            print(f"$ {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT)
            if os.path.exists(out):  # inference.py writes its JSON before failing its identical-detections check
                with open(out) as f:
                    results[name] = json.load(f)
            if proc.returncode != 0:
                print(f"{name} failed with exit status {proc.returncode}", file=sys.stderr)
                _save(results, args.out)
                return proc.returncode
            print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
        for i, dataset in enumerate(d for d in args.ap_datasets.split(",") if d and args.ap_ckpt):
            out = os.path.join(tmp, f"reduced_precision_ap{i}.json")
            cmd = [sys.executable, os.path.join(HERE, "inference.py"), "ap", "--cfg", args.ap_cfg, "--ckpt",
                   args.ap_ckpt, "--dataset", dataset, "--modes", "bf16,int8", "--json", out] + (
                       ["--threads", str(args.threads)] if args.threads else [])
            print(f"$ {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print("bf16/int8 AP check failed", file=sys.stderr)
                _save(results, args.out)
                return 1
            with open(out) as f:
                results.setdefault("reduced_precision_ap", []).append(json.load(f))
    _save(results, args.out)
    return subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), args.out, "--out", args.png],
                          cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
