"""Cost curves: how inference and training time and memory grow with image size, detections, batch and threads,
for ours and torchvision's ``maskrcnn_resnet50_fpn`` in the same run, the same weights (``common.py``).

    python benchmarks/scaling.py [--quick] [--rounds N] [--sections size,dets,batch,threads,train]
                                 [--json benchmarks/results/scaling.json] [--png-dir docs]

Models: ours = R-50-FPN from ``configs/torchvision/e2e_mask_rcnn_R-50-FPN.yaml`` with the inference speed features
as ``prepare_for_inference`` applies them by default (folded FrozenBN, fused conv+ReLU, channels-last, fp32) and,
for training, ``prepare_for_training`` with the config defaults; torchvision = the same weights in channels-last,
its best fp32 eager setting on this machine (``benchmarks/inference.py`` times plain too). Score threshold 0, so that
both always return ``DETECTIONS_PER_IM`` (ours) / ``box_detections_per_img`` (torchvision) detections with masks.

Sections (each point alternates the two models ``--rounds`` times after one warm-up call each; median and min-max):

- ``size``: inference at short side 480, 640, 800, 1024, 1333 (4:3 images, long side = 4/3 short side), 100
  detections; ``time / megapixel`` is printed so that growth faster than the pixels shows.
- ``dets``: inference at the smallest size with 10, 50, 100 detections.
- ``batch``: images/s for batches of 1, 2, 4 images (one call with a list of images) at the smallest size.
- ``threads``: images/s with ``torch.set_num_threads(1)`` and ``(2)``, batch 1, smallest size.
- ``train``: one SGD training step (forward with losses, backward, step) for batches of 1, 2, 4 at the smallest size.

Memory: peak resident set size (``VmHWM``) that one call adds above the resident size just before it (the high-water
mark is reset through ``/proc/self/clear_refs`` before every call; the largest of ``--memory-rounds`` calls after a
warm-up), measured in a child process that runs the same sections with glibc's mmap threshold fixed at 64 KiB
(``common.child_env``), so that freed tensors are returned and the peak tracks the live tensors. Times are taken in
this process, with glibc malloc keeping freed memory for both models (``--tune-malloc 1``, as ``tools/train_net.py``
and ``tools/test_net.py`` do with ``TUNE_MALLOC``): under the fixed threshold every large tensor is faulted in
afresh, which costs both models time that a user's run does not pay. (Before stop 33 times and memory came from one
process under the fixed threshold.)

Float denormals are flushed to zero in the whole process (both models; ``--flush-denormal 0`` keeps them), as
``tools/train_net.py`` does by default: repeated fp32 training steps otherwise slow down as their gradients shrink.

``--quick``: sizes 480, 800, 1333, 2 rounds (the full run: all five sizes, 5 rounds, as the docs' tables need).
Writes a JSON with the git commit and machine, PNG plots (matplotlib, optional) and prints the markdown tables of
``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import torch  # noqa: E402

OURS, TV = "ours", "torchvision channels-last"
SIZES_FULL = (480, 640, 800, 1024, 1333)
SIZES_QUICK = (480, 800, 1333)
DETS = (10, 50, 100)
BATCHES = (1, 2, 4)
THREADS = (1, 2)
SECTIONS = ("size", "dets", "batch", "threads", "train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="sizes 480, 800, 1333 and 2 rounds")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per point (default 5, --quick 2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--json", default=os.path.join(HERE, "results", "scaling.json"))
    p.add_argument("--png-dir", default=os.path.join(common.ROOT, "docs"), help="'' for no plots")
    p.add_argument("--memory-rounds", type=int, default=2, help="measured calls per point in the memory child")
    common.add_flush_denormal_arg(p)
    common.add_tune_malloc_arg(p)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def image_size(short: int):
    return short, int(round(short * 4 / 3))


def timed_points(fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, Dict[str, Any]]:
    """Alternate ``fns`` (one warm-up each, then ``rounds`` rounds with rotating order); per name the times and, in
    the memory child (:data:`MEMORY_ONLY`), the largest peak-RSS rise of one call (None elsewhere: with the
    allocator tuned, freed memory stays in the process and the rise means nothing)."""
    names = list(fns)
    for n in names:
        fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    peaks: Dict[str, Any] = {n: 0 if MEMORY_ONLY else None for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            base = common.reset_peak_rss() if MEMORY_ONLY else 0
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
            if MEMORY_ONLY:
                peaks[n] = max(peaks[n], common.peak_rss() - base)
    return {n: {"times_s": times[n], "median_s": common.median(times[n]), "peak_rss_bytes": peaks[n]}
            for n in names}


def inference_models(short: int, dets: int = 100):
    size = image_size(short)
    image = common.load_image(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=image, size=resize, score_thresh=0.0)
    tv.roi_heads.detections_per_img = dets
    ours = common.prepared(common.build_ours(tv, size=resize, opts=["TEST.DETECTIONS_PER_IM", dets]), "fp32")
    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    return image, {OURS: ours, TV: tv_cl}


def infer_fns(models, images) -> Dict[str, Callable[[], Any]]:
    return {n: (lambda m=m: m(list(images))) for n, m in models.items()}


#: Set in the memory child, whose times (under the fixed mmap threshold) are not the benchmark's.
MEMORY_ONLY = False


def log_point(section: str, key: Any, res: Dict[str, Dict[str, Any]], per: float = 1.0, unit: str = "") -> None:
    if MEMORY_ONLY:
        print(f"[memory: {section} {key}] " + "; ".join(
            f"{n} peak +{r['peak_rss_bytes'] / 2**20:.0f} MiB" for n, r in res.items()), flush=True)
        return
    parts = []
    for n, r in res.items():
        ts = r["times_s"]
        parts.append(f"{n} {r['median_s']:.3f} s ({min(ts):.2f}-{max(ts):.2f})"
                     + (f" {per / r['median_s']:.2f} {unit}" if unit else ""))
    print(f"[{section} {key}] " + "; ".join(parts) + f"; ratio {res[OURS]['median_s'] / res[TV]['median_s']:.2f}",
          flush=True)


def run_size(sizes, rounds) -> List[Dict[str, Any]]:
    rows = []
    with torch.no_grad():
        for s in sizes:
            image, models = inference_models(s)
            res = timed_points(infer_fns(models, [image]), rounds)
            log_point("size", s, res)
            rows.append({"short_side": s, "image": list(image.shape[-2:]), "megapixels": image[0].numel() / 1e6,
                         "results": res})
            del models
    return rows


def run_dets(short, rounds) -> List[Dict[str, Any]]:
    rows = []
    with torch.no_grad():
        for d in DETS:
            image, models = inference_models(short, d)
            counts = {n: int(m([image])[0]["boxes"].shape[0]) for n, m in models.items()}
            res = timed_points(infer_fns(models, [image]), rounds)
            log_point("dets", d, res)
            rows.append({"detections": d, "returned": counts, "results": res})
    return rows


def run_batch(short, rounds) -> List[Dict[str, Any]]:
    rows = []
    image, models = inference_models(short)
    images = [image] + [common.load_image(image_size(short), index=i) for i in range(1, max(BATCHES))]
    with torch.no_grad():
        for b in BATCHES:
            res = timed_points(infer_fns(models, images[:b]), rounds)
            log_point("batch", b, res, per=b, unit="img/s")
            rows.append({"batch": b, "results": res})
    return rows


def run_threads(short, rounds) -> List[Dict[str, Any]]:
    rows = []
    image, models = inference_models(short)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for t in THREADS:
                torch.set_num_threads(t)
                res = timed_points(infer_fns(models, [image]), rounds)
                log_point("threads", t, res, per=1, unit="img/s")
                rows.append({"threads": t, "results": res})
    finally:
        torch.set_num_threads(before)
    return rows


def run_train(short, rounds) -> List[Dict[str, Any]]:
    from maskrcnn.engine.speed import prepare_for_training

    size = image_size(short)
    resize = common.resize_setting(size)
    images = [common.load_image(size, index=i) for i in range(max(BATCHES))]
    targets = [common.synthetic_targets(im, num=4, seed=i) for i, im in enumerate(images)]
    tv = common.build_torchvision(calib_image=images[0], size=resize)
    ours = common.build_ours(tv, size=resize)
    prepare_for_training(ours)  # the config defaults (TRAIN.FUSE_FROZEN_BN, TRAIN.CHANNELS_LAST, TRAIN.WINOGRAD)
    models = {OURS: ours.train(), TV: tv.to(memory_format=torch.channels_last).train()}
    rows = []
    for b in BATCHES:
        fns = {}
        for n, m in models.items():
            params = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

            def step(m=m, opt=opt, b=b):
                torch.manual_seed(0)
                opt.zero_grad(set_to_none=True)
                sum(m(images[:b], [dict(t) for t in targets[:b]]).values()).backward()
                opt.step()
            fns[n] = step
        res = timed_points(fns, rounds)
        log_point("train", b, res, per=b, unit="img/s")
        rows.append({"batch": b, "results": res})
    return rows


def tables(out: Dict[str, Any]) -> str:
    """The markdown tables of ``docs/benchmarks.md``."""
    lines = []
    def cell(r):
        ts = r["times_s"]
        return f"{r['median_s']:.2f} s ({min(ts):.2f}-{max(ts):.2f}), +{r['peak_rss_bytes'] / 2**20:.0f} MiB"
    if "size" in out:
        base = out["size"][0]
        lines += ["| short side (image) | MPix | ours: time (spread), peak RSS | ours s/MPix | tv channels-last: time "
                  "(spread), peak RSS | tv s/MPix | ours / tv |", "|---|---|---|---|---|---|---|"]
        for row in out["size"]:
            o, t = row["results"][OURS], row["results"][TV]
            mp = row["megapixels"]
            lines.append(f"| {row['short_side']} ({row['image'][0]}x{row['image'][1]}) | {mp:.2f} | {cell(o)} | "
                         f"{o['median_s'] / mp:.2f} | {cell(t)} | {t['median_s'] / mp:.2f} | "
                         f"{o['median_s'] / t['median_s']:.2f} |")
        last = out["size"][-1]
        px = last["megapixels"] / base["megapixels"]
        for n in (OURS, TV):
            g = last["results"][n]["median_s"] / base["results"][n]["median_s"]
            m = last["results"][n]["peak_rss_bytes"] / max(base["results"][n]["peak_rss_bytes"], 1)
            lines.append(f"\n{n}: pixels x{px:.1f} from {base['short_side']} to {last['short_side']}, time x{g:.1f}, "
                         f"peak memory x{m:.1f}.")
        lines.append("")
    for key, title in (("dets", "detections"), ("batch", "batch"), ("threads", "threads"), ("train", "train batch")):
        if key not in out:
            continue
        per = key in ("batch", "threads", "train")
        lines += [f"| {title} | ours: time (spread), peak RSS | tv channels-last: time (spread), peak RSS |"
                  + (" ours img/s | tv img/s |" if per else "") + " ours / tv |",
                  "|---|---|---|" + ("---|---|" if per else "") + "---|"]
        for row in out[key]:
            o, t = row["results"][OURS], row["results"][TV]
            k = row[{"dets": "detections", "batch": "batch", "threads": "threads", "train": "batch"}[key]]
            n_img = row.get("batch", 1)
            extra = f" {n_img / o['median_s']:.2f} | {n_img / t['median_s']:.2f} |" if per else ""
            lines.append(f"| {k} | {cell(o)} | {cell(t)} |{extra} {o['median_s'] / t['median_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plots(out: Dict[str, Any], png_dir: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"plots need matplotlib (pip install matplotlib), or pass --png-dir '': {e}")
    specs = [("size", "megapixels", "image megapixels"), ("dets", "detections", "detections"),
             ("batch", "batch", "batch (images/call)"), ("threads", "threads", "threads"),
             ("train", "batch", "training batch")]
    specs = [s for s in specs if s[0] in out]
    fig, axes = plt.subplots(2, len(specs), figsize=(4 * len(specs), 7), squeeze=False)
    for i, (key, x, label) in enumerate(specs):
        xs = [row[x] for row in out[key]]
        for n, style in ((OURS, "o-"), (TV, "s--")):
            med = [row["results"][n]["median_s"] for row in out[key]]
            lo = [min(row["results"][n]["times_s"]) for row in out[key]]
            hi = [max(row["results"][n]["times_s"]) for row in out[key]]
            y = [xx / m for xx, m in zip(xs, med)] if key in ("batch", "train") else med
            axes[0][i].plot(xs, y, style, label=n)
            if key not in ("batch", "train"):
                axes[0][i].fill_between(xs, lo, hi, alpha=0.2)
            axes[1][i].plot(xs, [row["results"][n]["peak_rss_bytes"] / 2 ** 20 for row in out[key]], style, label=n)
        axes[0][i].set_ylabel("images/s" if key in ("batch", "train") else "seconds (median, min-max)")
        axes[1][i].set_ylabel("peak RSS added (MiB)")
        axes[1][i].set_xlabel(label)
        axes[0][i].set_title(key)
        axes[0][i].legend(fontsize=7)
    fig.suptitle(f"R-50-FPN Mask R-CNN, {out['machine']['cpu']}, {out['machine']['threads']} threads, "
                 f"commit {out['commit'][:12]}", fontsize=9)
    fig.tight_layout()
    os.makedirs(png_dir, exist_ok=True)
    path = os.path.join(png_dir, "benchmarks_scaling.png")
    fig.savefig(path, dpi=80)
    return [path]


def memory_child(args, sections: List[str]) -> Dict[str, Any]:
    """The peak-memory figures: the same sections in a child process under glibc's fixed mmap threshold."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--rounds", str(args.memory_rounds),
               "--sections", ",".join(sections), "--json", path, "--png-dir", "", "--flush-denormal",
               str(args.flush_denormal), "--tune-malloc", "0"] + (["--quick"] if args.quick else [])
        print(f"# peak memory: {' '.join(cmd[1:])} (glibc mmap threshold fixed)", flush=True)
        subprocess.run(cmd, env=common.child_env(), check=True)
        with open(path) as f:
            return json.load(f)


def merge_memory(out: Dict[str, Any], memory: Dict[str, Any], sections: List[str]) -> None:
    """Replace the timing process's peak-RSS figures (meaningless with malloc keeping freed memory) by the child's."""
    for s in sections:
        for row, mem_row in zip(out[s], memory[s]):
            for name, res in row["results"].items():
                res["peak_rss_bytes"] = mem_row["results"][name]["peak_rss_bytes"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
            raise SystemExit("--memory-child runs under common.child_env() (glibc's mmap threshold fixed)")
        global MEMORY_ONLY
        MEMORY_ONLY = True
    common.apply_flush_denormal(args.flush_denormal)  # first: the thread pool inherits it
    common.apply_tune_malloc(args.tune_malloc)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown {bad}; choose from {SECTIONS}")
    rounds = args.rounds or (2 if args.quick else 5)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    info = common.machine_info()
    out: Dict[str, Any] = {"benchmark": "scaling", "commit": common.git_commit(), "machine": info,
                           "quick": args.quick, "rounds": rounds, "flush_denormal": bool(args.flush_denormal),
                           "tune_malloc": bool(args.tune_malloc), "image_source": common.image_source(),
                           "memory": "peak RSS (VmHWM) added by one call above the RSS before it, max over "
                                     f"{args.memory_rounds} calls, in a child process with glibc's mmap threshold "
                                     "fixed at 64 KiB"}
    print(f"# scaling benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads, "
          f"load {info['load_avg_1min']}, capability {info['capability']}), torch {info['torch']}, rounds {rounds}, "
          f"commit {out['commit']}", flush=True)
    start = time.perf_counter()
    runners = {"size": lambda: run_size(sizes, rounds), "dets": lambda: run_dets(sizes[0], rounds),
               "batch": lambda: run_batch(sizes[0], rounds), "threads": lambda: run_threads(sizes[0], rounds),
               "train": lambda: run_train(sizes[0], rounds)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    for s in sections:
        out[s] = runners[s]()
        gc.collect()
        out["wall_s"] = time.perf_counter() - start
        with open(args.json, "w") as f:  # after every section, so that a stopped run keeps what it measured
            json.dump(out, f, indent=1)
    if args.memory_child:
        return 0
    merge_memory(out, memory_child(args, sections), sections)
    out["wall_s"] = time.perf_counter() - start
    common.write_json(args.json, out)
    print(f"wrote {args.json} ({out['wall_s']:.0f} s)")
    if args.png_dir:
        for p in plots(out, args.png_dir):
            print(f"wrote {p}")
    print()
    print(tables(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
