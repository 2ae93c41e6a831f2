"""The ``--auto`` recipe on the synthetic family and on Penn-Fudan: box and mask AP, minutes, iterations, and a
learning curve (AP at every snapshot) per dataset.

    python benchmarks/auto_variants.py --out /tmp/auto_runs --budget 10min            # every variant, 10 min each
    python benchmarks/auto_variants.py --out DIR --variants basic tiny --iters 600 --eval_every 150
    python benchmarks/auto_variants.py --out DIR --variants none --pennfudan ../shared/data/PennFudanPed-sample
    python benchmarks/auto_variants.py --out DIR --variants mixed --nproc 2 --threads 1   # torchrun, a process per core

Each dataset is trained exactly as a user would: ``tools/train_net.py --auto --dataset synthetic:V:train`` (the
Penn-Fudan sample is split 30 train / 10 held-out images and written as COCO json first, so it goes through the
COCO reader like a user's data), with snapshots every ``--eval_every`` iterations; then ``tools/test_net.py --cfg
OUT/V/config.yaml`` evaluates each snapshot on the validation split (with the test-time augmentation ``--auto``
chooses, as test_net and Predictor run it), and ``model_final`` once more without it ("one pass": what an exported
model gives). Results: ``OUT/results.json``,
``OUT/results.md`` (the table; held-out variants marked) and ``OUT/<dataset>/curve.png`` (OpenCV plot).
Minutes are wall-clock time of the training command (statistics, step timing, training, checkpoints; no
evaluation); on a shared CPU they depend on the load, which is recorded (``os.getloadavg``) with each run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)


#: OMP_NUM_THREADS / MKL_NUM_THREADS of every command (--threads): two scripts on 1 thread each can share 2 cores.
_THREADS: Dict[str, str] = {}


def _run(cmd: List[str], log_path: str) -> float:
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, PYTHONPATH=REPO, OMP_WAIT_POLICY="PASSIVE", **_THREADS))
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {rc}; see {log_path}")
    return time.time() - start


def _iteration(path: str) -> int:
    m = re.search(r"model_(\d+)\.pth$", path)
    return int(m.group(1)) if m else -1


def pennfudan_as_coco(root: str, out: str, num_val: int = 10) -> Dict[str, str]:
    """The Penn-Fudan images sorted by name, the last ``num_val`` as the held-out split, as COCO json + PNGs."""
    from torch.utils.data import Subset

    from maskrcnn.data.datasets.pennfudan import PennFudanDataset
    from maskrcnn.data.export_coco import export_coco

    full = PennFudanDataset(root, split="all")
    n = len(full)
    specs = {}
    for split, idx in (("train", range(0, n - num_val)), ("val", range(n - num_val, n))):
        part = Subset(full, list(idx))
        part.classes = full.classes
        d = os.path.join(out, split)
        if not os.path.isfile(os.path.join(d, "annotations.json")):
            export_coco(part, d)
        specs[split] = f"coco:{d}/annotations.json:{d}/images"
    return specs


def _evaluate(run_dir: str, ckpt: str, val_spec: str, ev: str, *sets: str) -> Dict[str, float]:
    """``{"box_ap", "mask_ap"}`` of ``ckpt`` by ``test_net --cfg RUN_DIR/config.yaml [--set SETS]`` into ``ev``
    (kept: an existing ``ev/metrics.json`` is read instead)."""
    if not os.path.isfile(os.path.join(ev, "metrics.json")):
        cmd = [sys.executable, "tools/test_net.py", "--cfg", os.path.join(run_dir, "config.yaml"), "--load_ckpt", ckpt,
               "--dataset", val_spec, "--output_dir", ev]
        _run(cmd + (["--set", *sets] if sets else []), ev + "_stdout.txt")
    with open(os.path.join(ev, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    return {"box_ap": m["bbox"]["AP"], "mask_ap": m["segm"]["AP"]}


def run_dataset(name: str, train_spec: str, val_spec: str, out: str, args) -> Dict:
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    # No --test_dataset: it would evaluate model_final inside the timed command; every snapshot is evaluated below.
    cmd = [sys.executable, "tools/train_net.py", "--auto", "--dataset", train_spec, "--output_dir", d]
    if args.nproc > 1:  # one training process per core, as a user with several cores would run it
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    sets = list(args.set)
    if args.iters:
        sets += ["SOLVER.MAX_ITER", str(args.iters)]
    else:
        cmd += ["--budget", args.budget]
    if args.eval_every:
        sets += ["TRAIN.SNAPSHOT_ITERS", str(args.eval_every)]
    if sets:
        cmd += ["--set"] + sets
    load_before = os.getloadavg()
    seconds = _run(cmd, os.path.join(d, "train_stdout.txt"))
    with open(os.path.join(d, "config.yaml"), encoding="utf-8") as f:
        max_iter = int(re.search(r"MAX_ITER: (\d+)", f.read()).group(1))
    curve = []
    ckpts = sorted(glob.glob(os.path.join(d, "model_*.pth")), key=_iteration)
    ckpts = [c for c in ckpts if _iteration(c) >= 0] + [os.path.join(d, "model_final.pth")]
    seen = set()
    for ckpt in ckpts:
        it = _iteration(ckpt) if _iteration(ckpt) >= 0 else max_iter
        if it in seen:
            continue
        seen.add(it)
        curve.append({"iter": it, **_evaluate(d, ckpt, val_spec, os.path.join(d, f"eval_{it:07d}"))})
    # The model alone, without the test-time augmentation --auto chooses (TEST.BBOX_AUG / TEST.MASK_AUG): what an
    # exported model (one pass) gives.
    plain = _evaluate(d, os.path.join(d, "model_final.pth"), val_spec, os.path.join(d, f"eval_{max_iter:07d}_plain"),
                      "TEST.BBOX_AUG.ENABLED", "False", "TEST.MASK_AUG.ENABLED", "False")
    with open(os.path.join(d, "auto.txt"), encoding="utf-8") as f:
        auto_lines = f.read().splitlines()
    result = {"dataset": name, "train": train_spec, "val": val_spec, "minutes": seconds / 60.0, "iterations": max_iter,
              "box_ap": curve[-1]["box_ap"], "mask_ap": curve[-1]["mask_ap"], "curve": curve, "plain": plain,
              "load_before": load_before, "load_after": os.getloadavg(), "auto": auto_lines,
              "threads": int(_THREADS.get("OMP_NUM_THREADS", 0)) or None, "processes": max(int(args.nproc), 1)}
    plot_curve(result, os.path.join(d, "curve.png"))
    return result


def plot_curve(result: Dict, path: str) -> None:
    """AP vs iteration, box (blue) and mask (red), with the 50 AP line (OpenCV; no matplotlib needed)."""
    import cv2
    import numpy as np

    w, h, m = 640, 400, 50
    img = np.full((h, w, 3), 255, np.uint8)
    xs = [p["iter"] for p in result["curve"]]
    x_max = max(max(xs), 1)

    def pt(it, ap):
        return int(m + (w - 2 * m) * it / x_max), int(h - m - (h - 2 * m) * max(ap, 0.0) / 100.0)

    cv2.rectangle(img, (m, m), (w - m, h - m), (0, 0, 0), 1)
    for ap in (25, 50, 75):
        cv2.line(img, pt(0, ap), pt(x_max, ap), (200, 200, 200) if ap != 50 else (0, 160, 0), 1)
        cv2.putText(img, str(ap), (8, pt(0, ap)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for key, colour in (("box_ap", (200, 80, 0)), ("mask_ap", (0, 0, 220))):
        pts = [pt(p["iter"], p[key]) for p in result["curve"]]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, 2)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1)
    cv2.putText(img, f"{result['dataset']}: box AP (blue) {result['box_ap']:.1f}, mask AP (red) {result['mask_ap']:.1f}",
                (m, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, f"iterations (max {x_max}); {result['minutes']:.1f} min", (m, h - 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.imwrite(path, img)


def write_table(results: List[Dict], path: str) -> str:
    from maskrcnn.data.datasets.synthetic_family import VARIANTS

    rows = ["| dataset | held out | box AP | mask AP | one pass: box / mask AP | minutes | iterations | threads | "
            "load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v = VARIANTS.get(r["dataset"])
        held = "yes" if (v is None or v.held_out) else "no"
        load = f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"
        threads = str(r.get("threads") or "all")
        if r.get("processes", 1) > 1:
            threads = f"{r['processes']} processes x {threads}"
        plain = r.get("plain")
        one = f"{plain['box_ap']:.1f} / {plain['mask_ap']:.1f}" if plain else "-"
        rows.append(f"| {r['dataset']} | {held} | {r['box_ap']:.1f} | {r['mask_ap']:.1f} | {one} | "
                    f"{r['minutes']:.1f} | {r['iterations']} | {threads} | {load} |")
    text = "\n".join(rows) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    from maskrcnn.data.datasets.synthetic_family import VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="variant names, or 'none'")
    p.add_argument("--pennfudan", default=None, help="Penn-Fudan root to add (30 train / 10 held-out images)")
    p.add_argument("--budget", default="10min", help="train_net --budget (ignored with --iters)")
    p.add_argument("--iters", type=int, default=0, help="explicit SOLVER.MAX_ITER instead of a time budget")
    p.add_argument("--eval_every", type=int, default=0, help="snapshot (and evaluate) every N iterations")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY VALUE", help="extra config overrides")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of each command (OMP_NUM_THREADS; 0: torch's default, every core)")
    p.add_argument("--nproc", type=int, default=1,
                   help="training processes (torchrun --standalone --nproc_per_node N; gloo on a CPU); the "
                        "evaluations run in one process")
    args = p.parse_args(argv)
    if args.threads:
        _THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = []
    if os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    jobs = [(v, f"synthetic:{v}:train", f"synthetic:{v}:val") for v in args.variants if v != "none"]
    if args.pennfudan:
        specs = pennfudan_as_coco(args.pennfudan, os.path.join(args.out, "pennfudan_data"))
        jobs.append(("pennfudan", specs["train"], specs["val"]))
    for name, train_spec, val_spec in jobs:
        r = run_dataset(name, train_spec, val_spec, args.out, args)
        results = [x for x in results if x["dataset"] != name] + [r]
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"{name}: box AP {r['box_ap']:.1f}, mask AP {r['mask_ap']:.1f}, {r['minutes']:.1f} min, "
              f"{r['iterations']} iterations; curve " + ", ".join(f"{c['iter']}:{c['box_ap']:.0f}/{c['mask_ap']:.0f}"
                                                                  for c in r["curve"]), flush=True)
    print(write_table(results, os.path.join(args.out, "results.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
