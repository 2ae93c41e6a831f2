"""Data at COCO's scale without COCO: loading a train2017-sized json into the dataset index, DataLoader workers
reading it, and the COCO evaluation of 5,000 images x 100 detections with pycocotools and faster-coco-eval.

Steps (all inputs from :mod:`benchmarks.coco_json`, seeded, cached under ``--cache``):

1. ``index``: a json of 118,287 images and 860,001 annotations (polygons, compressed and uncompressed RLE, crowd
   and not) is loaded by ``COCODataset`` in a fresh process: wall time, peak RSS (``VmHWM``), RSS once loaded and
   the bytes of the packed index. Then ``--workers`` DataLoader workers (fork) read the records of every image
   once (``dataset.records(i)``: polygons and RLEs decoded to Python objects, as ``get_target`` does before
   rasterising); afterwards each worker's RSS, PSS and USS (private pages, from ``/proc/<pid>/smaps_rollup``) are
   read. USS is what a worker costs on its own: copy-on-write growth shows there.
   ``--compare-dict`` measures the same for the straightforward index that ``COCODataset`` used to hold (the
   pycocotools ``COCO`` object plus one dict per annotation with its polygons as float lists), built in the
   child from the same dataset.
2. ``eval``: a val2017-sized ground truth (5,000 images, 36,781 objects) and 100 detections per image (boxes and
   RLE masks) are evaluated by ``maskrcnn.evaluation.evaluate_coco`` with ``evaluator="pycocotools"`` and with
   ``"faster_coco_eval"``, alternating, ``--rounds`` times each (a fresh ground-truth object each time, since
   pycocotools converts its polygons in place); the APs of both must agree to 4 decimals (in percent).

Prints a table and writes ``--out`` (JSON with the git commit and machine).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.coco_json import COCO_TRAIN2017, COCO_VAL2017, make_coco_json, make_detections, write_coco_json  # noqa: E402,E501

MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=COCO_TRAIN2017[0])
    p.add_argument("--annotations", type=int, default=COCO_TRAIN2017[1])
    p.add_argument("--eval-images", type=int, default=COCO_VAL2017[0])
    p.add_argument("--eval-objects", type=int, default=COCO_VAL2017[1])
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timed evaluations per evaluator and iou type")
    p.add_argument("--compare-dict", action="store_true", help="also measure the straightforward dict index")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: index, eval")
    p.add_argument("--quick", action="store_true", help="a 1/20 scale smoke run")
    p.add_argument("--cache", default="/tmp/maskrcnn_bench_data", help="folder of the generated json")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "benchmarks", "data.json"))
    p.add_argument("--child-index", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-mode", default="packed", choices=("packed", "dict"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.annotations = args.images // 20, args.annotations // 20
        args.eval_images, args.eval_objects = args.eval_images // 20, args.eval_objects // 20
    return args


# --- memory of a process --------------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> Dict[str, int]:
    """``{"rss", "pss", "uss"}`` in bytes of process ``pid`` (USS = private clean + private dirty)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        text = f.read()
    kib = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {"rss": kib["Rss"] * 1024, "pss": kib["Pss"] * 1024,
            "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) * 1024}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


# --- step 1, in a child process ---------------------------------------------------------------------------------------
class _RecordPass:
    """Item ``i``: ``(worker pid, a checksum of image i's records)``: the records read down to every polygon
    coordinate, as an item read does before rasterising the masks."""

    def __init__(self, dataset, records=None):
        self.dataset, self.records = dataset, records

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        recs = self.records[i] if self.records is not None else self.dataset.records(i)
        n = 0.0
        for r in recs:
            # every coordinate and count is read, as rasterising the masks does
            segm = r["segmentation"]
            n += sum(map(sum, segm)) if isinstance(segm, list) else (
                sum(segm["counts"]) if isinstance(segm["counts"], list) else len(segm["counts"]))
            n += sum(r["box"]) + r["label"] + r["iscrowd"]
        return os.getpid(), n


def _collate(batch):
    return batch[0][0], sum(b[1] for b in batch)


def child_index(args) -> Dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from maskrcnn.data.datasets.coco import COCODataset

    torch.set_num_threads(1)
    gc.collect()
    rss0 = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    ds = COCODataset(args.child_index, os.path.dirname(args.child_index))
    records = None
    if args.child_mode == "dict":
        # what COCODataset held before the packed index: the pycocotools index and one dict per annotation
        _ = ds.coco
        records = [ds.records(i) for i in range(len(ds))]
        ds._index = None  # only the straightforward structures remain
        ds.records = None
    load_s = time.perf_counter() - t0
    gc.collect()
    out: Dict[str, Any] = {"mode": args.child_mode, "images": len(ds), "load_s": load_s,
                           "rss_before_bytes": rss0, "peak_rss_bytes": _status_bytes("VmHWM"),
                           "rss_loaded_bytes": _status_bytes("VmRSS")}
    if args.child_mode == "packed":
        out["index_bytes"] = ds._index.nbytes()
        out["annotations"] = ds._index.num_annotations
    else:
        out["annotations"] = sum(len(r) for r in records)
    loader = DataLoader(_RecordPass(ds, records), batch_size=256, num_workers=args.workers, collate_fn=_collate,
                        persistent_workers=True, multiprocessing_context="fork")
    t0 = time.perf_counter()
    it = iter(loader)
    pids, total = set(), 0
    for pid, n in it:
        pids.add(pid)
        total += n
    out["pass_s"] = time.perf_counter() - t0
    out["pass_items"] = total
    out["parent"] = smaps_rollup(os.getpid())
    out["workers"] = [smaps_rollup(pid) for pid in sorted(pids)]  # alive: persistent workers wait for the next epoch
    del it
    return out


def run_index(args, json_path: str, mode: str) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-index", json_path, "--child-mode", mode,
           "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- step 2 -----------------------------------------------------------------------------------------------------------
def run_eval(args) -> Dict[str, Any]:
    import contextlib
    import io

    from pycocotools.coco import COCO

    from maskrcnn.evaluation.coco import evaluate_coco, resolve_evaluator

    t0 = time.perf_counter()
    gt_dict = make_coco_json(args.eval_images, args.eval_objects, seed=1)
    bbox, segm = make_detections(gt_dict, args.dets, seed=2)
    gen_s = time.perf_counter() - t0
    gt_text = json.dumps(gt_dict)
    evaluators = ["pycocotools"]
    if resolve_evaluator("auto") == "faster_coco_eval":
        evaluators.append("faster_coco_eval")
    times: Dict[str, Dict[str, List[float]]] = {e: {"bbox": [], "segm": []} for e in evaluators}
    metrics: Dict[str, Dict[str, Dict[str, float]]] = {}
    for r in range(args.rounds):
        for ev in (evaluators if r % 2 == 0 else evaluators[::-1]):
            for iou_type, dets in (("bbox", bbox), ("segm", segm)):
                gt = COCO()
                gt.dataset = json.loads(gt_text)
                with contextlib.redirect_stdout(io.StringIO()):
                    gt.createIndex()
                gc.collect()
                t = time.perf_counter()
                m = evaluate_coco(gt, {iou_type: dets}, log=lambda s: None, evaluator=ev)
                times[ev][iou_type].append(time.perf_counter() - t)
                metrics.setdefault(ev, {}).update(m)
                print(f"  eval round {r + 1}/{args.rounds} {ev:16s} {iou_type}: {times[ev][iou_type][-1]:.1f} s",
                      flush=True)
    out: Dict[str, Any] = {"images": args.eval_images, "objects": args.eval_objects, "detections": len(bbox),
                           "generate_s": gen_s, "times_s": times, "metrics": metrics}
    if len(evaluators) == 2:
        a, b = metrics["pycocotools"], metrics["faster_coco_eval"]
        diff = max(abs(a[t][k] - b[t][k]) for t in a for k in a[t])
        out["max_abs_ap_diff_percent"] = diff
        out["ap_equal_4_decimals"] = all(round(a[t][k], 4) == round(b[t][k], 4) for t in a for k in a[t])
    return out


# --- report -----------------------------------------------------------------------------------------------------------
def _spread(xs: List[float]) -> str:
    return f"{statistics.median(xs):.2f} s [{min(xs):.2f}-{max(xs):.2f}]"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def report_index(r: Dict[str, Any]) -> List[str]:
    w = r["workers"]
    lines = [f"index ({r['mode']}): {r['images']} images, {r['annotations']} annotations: load {r['load_s']:.1f} s, "
             f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB, RSS loaded {r['rss_loaded_bytes'] / MIB:.0f} MiB "
             f"(process before loading {r['rss_before_bytes'] / MIB:.0f} MiB)"
             + (f", packed arrays {r['index_bytes'] / MIB:.0f} MiB" if "index_bytes" in r else "")]
    def mib(key: str) -> str:
        return ", ".join(f"{x[key] / MIB:.0f}" for x in w)

    lines.append(f"  {len(w)} workers after a full pass ({r['pass_s']:.1f} s): RSS {mib('rss')} MiB; PSS "
                 f"{mib('pss')} MiB; USS {mib('uss')} MiB; parent RSS {r['parent']['rss'] / MIB:.0f} / "
                 f"PSS {r['parent']['pss'] / MIB:.0f} MiB; total PSS "
                 f"{(r['parent']['pss'] + sum(x['pss'] for x in w)) / MIB:.0f} MiB")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_index:
        print(json.dumps(child_index(args)))
        return
    from benchmarks.common import machine_info

    skip = set(filter(None, args.skip.split(",")))
    result: Dict[str, Any] = {"commit": git_commit(), "machine": machine_info(), "args": vars(args)}
    if "index" not in skip:
        os.makedirs(args.cache, exist_ok=True)
        path = os.path.join(args.cache, f"coco_{args.images}x{args.annotations}_seed0.json")
        if not os.path.isfile(path):
            t = time.perf_counter()
            write_coco_json(path, args.images, args.annotations)
            result["generate_s"] = time.perf_counter() - t
            print(f"generated {path} in {result['generate_s']:.0f} s")
        result["json_bytes"] = os.path.getsize(path)
        print(f"json: {path}, {result['json_bytes'] / MIB:.0f} MiB")
        for mode in ["packed"] + (["dict"] if args.compare_dict else []):
            result[f"index_{mode}"] = run_index(args, path, mode)
            print("\n".join(report_index(result[f"index_{mode}"])), flush=True)
    if "eval" not in skip:
        ev = run_eval(args)
        result["eval"] = ev
        print(f"eval: {ev['images']} images, {ev['objects']} objects, {ev['detections']} detections "
              f"(generated in {ev['generate_s']:.0f} s)")
        for name, per in ev["times_s"].items():
            print(f"  {name:16s} bbox {_spread(per['bbox'])}  segm {_spread(per['segm'])}  "
                  f"(AP bbox {ev['metrics'][name]['bbox']['AP']:.4f}, segm {ev['metrics'][name]['segm']['AP']:.4f})")
        if "ap_equal_4_decimals" in ev:
            print(f"  APs equal to 4 decimals: {ev['ap_equal_4_decimals']} (max |diff| "
                  f"{ev['max_abs_ap_diff_percent']:.2e} points)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
