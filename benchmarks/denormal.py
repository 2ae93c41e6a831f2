"""Repeated fp32 training steps with float denormals kept and flushed: the table of docs/benchmarks.md, "Denormals".

    python benchmarks/denormal.py [--steps 7] [--runs ours-fp32] [--quick] [--json OUT]

Each (run, setting) steps one model in a fresh process (the FTZ/DAZ flags are per process thread and must be set
before torch's thread pool starts): the ``train_step.py`` model (R-50-FPN, batch 2 at 800x1066, ``--quick``
480x640) is built, then ``--steps`` SGD steps are timed one by one, the weights updated by each step as in
training. Without flushing, the steps slow down as the activations and gradients meet denormals; the weights
themselves stay normal (the count of denormal parameters after each step is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def child(run: str, flush: int, steps: int, quick: bool) -> Dict[str, Any]:
    common.apply_flush_denormal(flush)  # first: the thread pool inherits it
    import torch
    import train_step

    size = common.QUICK_IMAGE_SIZE if quick else common.IMAGE_SIZE
    model, step, _ = train_step.build(run, size, train_step.features(train_step.parse_args([])))
    tiny = torch.finfo(torch.float32).tiny
    times: List[float] = []
    denormal_params: List[int] = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        denormal_params.append(sum(int(((p.abs() < tiny) & (p != 0)).sum()) for p in model.parameters()))
    return {"run": run, "flush_denormal": bool(flush), "times_s": times, "denormal_params": denormal_params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--runs", default="ours-fp32", help=f"comma-separated subset of {train_step_models()}")
    p.add_argument("--quick", action="store_true", help="480x640 images")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("RUN", "FLUSH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.quick)))
        return 0
    info = common.machine_info()
    print(f"# denormals benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads, "
          f"load {info['load_avg_1min']}), torch {info['torch']}, {args.steps} steps per run", flush=True)
    rows = []
    for run in [r for r in args.runs.split(",") if r]:
        for flush in (0, 1):
            extra = ["--child", run, str(flush), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            row = common.run_child("denormal.py", extra, timeout=3600, fixed_mmap=False)  # glibc's defaults
            rows.append(row)
            print(f"| {run} | {'flushed' if flush else 'kept'} | " + " | ".join(f"{t:.2f} s" for t in row["times_s"])
                  + f" | denormal parameters after each step: {row['denormal_params']} |", flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "denormal", "commit": common.git_commit(), "machine": info,
                                      "steps": args.steps, "quick": args.quick, "rows": rows})
    return 0


def train_step_models():
    import train_step

    return train_step.MODELS


if __name__ == "__main__":
    sys.exit(main())
