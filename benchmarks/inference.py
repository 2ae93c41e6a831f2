"""Inference speed: our R-50-FPN Mask R-CNN against torchvision's ``maskrcnn_resnet50_fpn``, same weights, same image.

    python benchmarks/inference.py [--quick] [--modes fp32,bf16,int8] [--score-threshes 0,0.05] [--repeats 5]
                                   [--json OUT]
    python benchmarks/inference.py --ablation [--quick] [--threads N]    # the speed features one at a time
    python benchmarks/inference.py ap --cfg CFG --ckpt CKPT [--dataset synthetic:val] [--modes bf16,int8]
                                                                          # bf16 / int8 AP against fp32

Both models get one RGB image resized to 800x1066 (``--quick``: 480x640), once per score threshold: 0 (both
return 100 detections with masks pasted into the image) and 0.05 (the configs' default ``TEST.SCORE_THRESH``).
Models (see ``common.py``): torchvision's layout with seeded random, BN-calibrated weights; ours is
``configs/torchvision/e2e_mask_rcnn_R-50-FPN.yaml`` with the converted weights and the inference speed features of
``maskrcnn.engine.speed.prepare_for_inference``:

* ``ours-fp32``: FrozenBN folded, oneDNN conv+ReLU(+add) fusion, channels-last. **Checked**: its detections must be
  identical to torchvision plain's (``common.compare_detections``: same count, same labels in the same order,
  boxes within ``common.BOX_TOL`` = 0.01 px, scores within ``SCORE_TOL`` = 1e-4, pasted mask probabilities within
  ``MASK_TOL`` = 1e-3), at every score threshold; otherwise the run exits with status 1 (after writing the JSON).
* ``ours-bf16``: the same plus bf16 autocast with fp32 box maths. Not checked one to one (bf16 re-ranks near-tied
  random-weight scores); accuracy is judged by AP instead (``ap`` sub-command, on a trained model).
* ``ours-int8``: ``TEST.QUANTIZE int8`` (body, FPN and the heads' feature layers in int8, ``maskrcnn.engine.quantize``),
  calibrated on ``--calib`` other images of the same source and size (``common.load_image`` indices 1..; for the
  trained rows the next synthetic:val images), channels-last. Not checked one to one either; its AP against fp32
  is the ``ap --modes int8`` sub-command.
* torchvision in its three eager settings (``common.TV_SETTINGS``): plain, channels-last, and bf16 autocast +
  channels-last.

All runs (both thresholds) alternate in every round, with no warm-up beyond the output check, for ``--repeats``
rounds (default 5); medians and the spread (min-max) are printed with ``ratio`` to torchvision plain (today's
figure) and the fair ratios: ours fp32 / torchvision's best fp32 setting, ours bf16 / torchvision bf16 +
channels-last (``common.fair_ratios``). FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on each
model's plain eager graph and divided by the median time to give GFLOP/s and the fraction of this machine's
peak in fp32, bf16 and int8: the better of a 4096^3 matmul (int8: ``torch._int_mm``, GOP/s, the int8 run's FLOPs
counted as operations) and the model's largest convolution run by the models' own kernels
(``common.conv_runner``: oneDNN in fp32 / bf16, the x86 quantized engine in int8), both timed in every round. Peak memory is measured in a fresh child process per model
(``common.py``). The JSON records the commit. glibc malloc keeps freed memory for every model in the timing
process (``--tune-malloc``, default 1, as ``tools/test_net.py`` does with ``TUNE_MALLOC``); the memory children
run with glibc's mmap threshold fixed instead.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

MODES = ("fp32", "bf16", "int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="480x640 image, 3 repeats")
    p.add_argument("--modes", default="fp32,bf16,int8", help="comma-separated subset of fp32,bf16,int8")
    p.add_argument("--calib", type=int, default=4, help="calibration images of ours-int8")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default 5, quick 3)")
    p.add_argument("--score-threshes", default="0,0.05",
                   help="comma-separated score thresholds, one set of rows each (0: 100 detections everywhere; "
                        "0.05: the configs' default TEST.SCORE_THRESH)")
    p.add_argument("--trained", nargs="?", const="train", default=None, metavar="PATH",
                   help="add rows with trained weights (well-separated detections) at score threshold 0.05 on "
                        "synthetic:val images: R-50-FPN fine-tuned here on synthetic:train (benchmarks/trained.py), "
                        "or the torchvision state dict at PATH that --save-trained wrote")
    p.add_argument("--trained-iters", type=int, default=60, help="fine-tuning steps when --trained trains")
    p.add_argument("--trained-images", type=int, default=2, help="synthetic:val images per trained-row call")
    p.add_argument("--save-trained", default=None, help="save the fine-tuned torchvision state dict here")
    p.add_argument("--only-trained", action="store_true", help="time only the trained rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--budget", type=float, default=None, help="stop timing rounds (at least 2) after this many seconds (default: never)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--no-peak", action="store_true", help="skip the peak probes (4096^3 matmul, largest convolution) (minutes on a "
                   "loaded machine; the 'of peak' columns then show -)")
    p.add_argument("--json", default=None, help="write the results here")
    common.add_tune_malloc_arg(p)
    p.add_argument("--ablation", action="store_true",
                   help="time ours with the speed features switched on one after the other instead")
    p.add_argument("--child-memory", default=None, choices=("torchvision",) + tuple(f"ours-{m}" for m in MODES),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def calib_images(size, n: int) -> List[torch.Tensor]:
    """int8 calibration images: the benchmark source's images after the timed one (index 0), same size."""
    return [common.load_image(size, index=i) for i in range(1, n + 1)]


def build_models(size, modes, score_thresh: float = 0.0, calib: int = 4) -> Dict[str, Any]:
    """The timed callables of one score threshold: ours per mode and torchvision in its three settings
    (``common.TV_SETTINGS``), the same weights; plus the plain models, for the outputs and FLOP counts."""
    image = common.load_image(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=image, size=resize, score_thresh=score_thresh)
    ours = common.build_ours(tv, size=resize, score_thresh=score_thresh)
    fns = common.torchvision_settings(tv, lambda m: m([image]))
    if "bf16" not in modes:  # --modes fp32: no bf16 run on either side
        del fns[common.TV_BF16]
    for mode in modes:
        model = common.prepared(copy.deepcopy(ours), mode, calib_images(size, calib) if mode == "int8" else None)
        fns[f"ours-{mode}"] = lambda m=model: m([image])
    return {"images": [image], "fns": fns, "tv": tv, "plain": ours}


def build_trained(args, modes, score_thresh: float) -> Dict[str, Any]:
    """As :func:`build_models` with trained weights (``trained.py``) on ``--trained-images`` synthetic:val
    images; torchvision holds the weights after the torchvision -> ours -> torchvision round trip."""
    import trained

    if args.trained == "train":
        tv = trained.train_torchvision(iters=args.trained_iters)
        if args.save_trained:
            trained.save(tv, args.save_trained)
    else:
        tv = trained.load_torchvision(args.trained)
    tv, ours = trained.round_trip(tv, score_thresh)
    images = trained.val_images(args.trained_images + args.calib)
    images, calib = images[:args.trained_images], images[args.trained_images:]
    fns = common.torchvision_settings(tv, lambda m: m(images))
    if "bf16" not in modes:
        del fns[common.TV_BF16]
    for mode in modes:
        model = common.prepared(copy.deepcopy(ours), mode, calib if mode == "int8" else None)
        fns[f"ours-{mode}"] = lambda m=model: m(images)
    return {"images": images, "fns": fns, "tv": tv, "plain": ours}


def row_name(name: str, key: str) -> str:
    return f"{name} @{key}"


def set_key(score_thresh: float, is_trained: bool = False) -> str:
    return ("trained," if is_trained else "") + f"score>={score_thresh:g}"


def child_memory(args) -> None:
    """Peak RSS added by one inference of one model (runs in a fresh process)."""
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    image = common.load_image(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=image, size=resize)
    if args.child_memory == "torchvision":
        model = tv
    else:
        mode = args.child_memory.split("-", 1)[1]
        model = common.prepared(common.build_ours(tv, size=resize), mode,
                                calib_images(size, args.calib) if mode == "int8" else None)
        del tv
    gc.collect()
    with torch.no_grad():
        model([image])
        gc.collect()
        peak = common.measure_peak_memory(lambda: model([image]))
    print(json.dumps({"model": args.child_memory, "peak_bytes": peak}))


def run(args) -> Dict[str, Any]:
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    threshes = [float(t) for t in args.score_threshes.split(",") if t]
    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    repeats = args.repeats or (3 if args.quick else 5)
    info = common.machine_info()
    print(f"# inference benchmark {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads, "
          f"load {info['load_avg_1min']}), torch {info['torch']}, capability {info['capability']}, image "
          f"{size[0]}x{size[1]} ({common.image_source()}), score thresholds {threshes}, malloc "
          f"{'tuned' if getattr(args, 'tune_malloc', 0) else 'default'}, commit {common.git_commit()}")
    # Each peak is the better of a 4096^3 matmul (int8: torch._int_mm, GOP/s) and the model's largest convolution
    # with its own kernels (common.conv_runner): MKL's fp32 / bf16 matmul is slower than oneDNN's convolution on
    # some CPUs, and the fraction of the peak must not flatter the models.
    peak_dtypes = {} if args.no_peak else {"fp32": torch.float32, **({"bf16": torch.bfloat16} if "bf16" in modes
                                                                     else {}),
                                           **({"int8": torch.int8} if "int8" in modes else {})}
    probes = {name: common.compute_peak(dt) for name, dt in peak_dtypes.items()}
    for name, pr in probes.items():
        print(f"peak {name}: matmul {pr['matmul']:.0f}, convolution {pr['conv']:.0f} "
              f"{'GOP/s' if name == 'int8' else 'GFLOP/s'}")

    fns: Dict[str, Any] = {}
    checks: Dict[str, Dict[str, Any]] = {}
    flops: Dict[str, int] = {}
    detections: Dict[str, Dict[str, Any]] = {}
    if args.only_trained and not args.trained:
        args.trained = "train"
    sets = [] if args.only_trained else [(thr, False) for thr in threshes]
    if args.trained:
        sets.append((0.05, True))
    with torch.no_grad():
        for thr, is_trained in sets:
            key = set_key(thr, is_trained)
            built = build_trained(args, modes, thr) if is_trained else build_models(size, modes, thr, args.calib)
            images = built["images"]
            outputs = {name: fn() for name, fn in built["fns"].items()}
            for i in range(len(images)):
                ref = outputs[common.TV_PLAIN][i]
                scores = ref["scores"]
                gaps = scores[:-1] - scores[1:]
                dkey = key + (f",image{i}" if len(images) > 1 else "")
                detections[dkey] = {"count": int(scores.numel()),
                                    "min_score_gap": float(gaps.min()) if gaps.numel() else None,
                                    "score_range": [float(scores.min()), float(scores.max())]
                                    if scores.numel() else None}
                print(f"{dkey}: torchvision returns {scores.numel()} detections, scores "
                      f"{detections[dkey]['score_range']}, smallest gap between consecutive scores "
                      f"{detections[dkey]['min_score_gap']}")
                for name, out in outputs.items():
                    if name == common.TV_PLAIN:
                        continue
                    c = common.compare_detections(ref, out[i])
                    checks[row_name(name, dkey)] = c
                    print(f"detections {row_name(name, dkey)} vs torchvision plain: {c['count_b']} vs "
                          f"{c['count_a']}, identical={c['identical']} (same order {c['in_same_order']}, max |d box| "
                          f"{c['max_box_diff']}, max |d score| {c['max_score_diff']}, max |d mask prob| "
                          f"{c['max_mask_diff']}, same label & IoU>=0.9: {100 * c['matched_iou90']:.0f}%)")
            flops[key] = {"torchvision": common.count_flops(lambda: built["tv"](images)),
                          "ours": common.count_flops(lambda: built["plain"](images))}
            fns.update({row_name(n, key): f for n, f in built["fns"].items()})
        # The peak probes run in every round too: the peak is their best time under the models' conditions.
        conv_flops = common.add_peak_probes(fns, peak_dtypes)
        times = common.alternate(fns, repeats=repeats, warmup=0, budget_s=args.budget)
        for name, best in common.pop_peaks(times, conv_flops).items():
            pr = probes[name]
            pr["matmul"], pr["conv"] = max(pr["matmul"], best["matmul"]), max(pr["conv"], best["conv"])
            pr["peak"] = max(pr["matmul"], pr["conv"])
        if probes:
            print("peak (best of all rounds; matmul / convolution): " + ", ".join(
                f"{name} {pr['peak']:.0f} ({pr['matmul']:.0f} / {pr['conv']:.0f})" for name, pr in probes.items()))
        peak_fp32, peak_bf16, peak_int8 = (probes[n]["peak"] if n in probes else None
                                           for n in ("fp32", "bf16", "int8"))
    del fns
    gc.collect()

    medians = {n: common.median(t) for n, t in times.items()}
    rows: List[Dict[str, Any]] = []
    ratios: Dict[str, Dict[str, float]] = {}
    for thr, is_trained in sets:
        key = set_key(thr, is_trained)
        med = {n: medians[row_name(n, key)] for n in common.TV_SETTINGS + tuple(f"ours-{m}" for m in modes)
               if row_name(n, key) in medians}
        ratios[key] = common.fair_ratios(med, "ours-fp32", "ours-bf16", "ours-int8")
        tv_fp32 = [n for n in (common.TV_PLAIN, common.TV_CL) if n in med]
        print(f"{key}: torchvision's fastest fp32 setting here: {min(tv_fp32, key=med.get)}")
        for name, m in med.items():
            fl = flops[key]["ours" if name.startswith("ours") else "torchvision"]
            gflops = fl / m / 1e9
            row = {"model": row_name(name, key), "score_thresh": thr, "trained": is_trained, "median_s": m,
                   "times_s": times[row_name(name, key)], "ratio": m / med[common.TV_PLAIN], "gflop": fl / 1e9,
                   "gflop_per_s": gflops, "fraction_of_fp32_peak": gflops / peak_fp32 if peak_fp32 else None}
            if "bf16" in name and peak_bf16:
                row["fraction_of_bf16_peak"] = gflops / peak_bf16
            if name == "ours-int8" and peak_int8:
                row["fraction_of_int8_peak"] = gflops / peak_int8
            rows.append(row)
    memory: Dict[str, int] = {}
    if not args.no_memory:
        for name in ("torchvision",) + tuple(f"ours-{m}" for m in modes):
            child = ["--child-memory", name, "--calib", str(args.calib)] + (["--quick"] if args.quick else [])
            if args.threads:
                child += ["--threads", str(args.threads)]
            memory[name] = common.run_child("inference.py", child)["peak_bytes"]
        for r in rows:
            key = r["model"].split(" @")[0]
            key = "torchvision" if key == common.TV_PLAIN else key
            if key in memory:
                r["peak_memory_bytes"] = memory[key]

    print(f"\n| model | median | spread (min-max) | ratio to tv plain | GFLOP | GFLOP/s | of fp32 peak | "
          f"of bf16 / int8 peak | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = common.fmt_mib(r["peak_memory_bytes"]) if "peak_memory_bytes" in r else "-"
        low = r.get("fraction_of_bf16_peak", r.get("fraction_of_int8_peak"))
        bf = f"{100 * low:.0f}%" if low is not None else "-"
        fp = f"{100 * r['fraction_of_fp32_peak']:.0f}%" if r["fraction_of_fp32_peak"] is not None else "-"
        print(f"| {r['model']} | {common.fmt_s(r['median_s'])} | {common.spread(r['times_s'])} | {r['ratio']:.3f} | "
              f"{r['gflop']:.0f} | {r['gflop_per_s']:.0f} | {fp} | {bf} | "
              f"{mem} |")
    print("\n| rows | ratio | value |\n|---|---|---|")
    for thr, rs in ratios.items():
        for k, v in rs.items():
            print(f"| {thr} | {k} | {v:.3f} |")
    print(f"rounds: {len(times[rows[0]['model']])} (alternated)")
    failed = common.require_identical({k: v for k, v in checks.items() if "ours-fp32" in k})
    return {"benchmark": "inference", "commit": common.git_commit(), "machine": info, "image_size": list(size),
            "image": common.image_source(), "repeats": repeats, "score_thresholds": threshes,
            "tune_malloc": bool(getattr(args, "tune_malloc", 0)),
            "sets": [set_key(t, tr) for t, tr in sets],
            "matmul_peak_gflops": {"fp32": peak_fp32, "bf16": peak_bf16, "int8": peak_int8},
            "peak_probes_gflops": probes, "rows": rows,
            "ratios": ratios,
            "detections": checks, "torchvision_detections": detections, "identical_check_failed": failed}


# --- one feature at a time ------------------------------------------------------------------------------------------
#: (name, prepare_for_inference arguments), each adding one feature to the previous.
ABLATION = (
    ("ours, no speed feature", dict(fold_bn=False, fuse_activations=False, channels_last=False, amp="")),
    ("+ FrozenBN folded", dict(fold_bn=True, fuse_activations=False, channels_last=False, amp="")),
    ("+ channels-last", dict(fold_bn=True, fuse_activations=False, channels_last=True, amp="")),
    ("+ oneDNN conv+ReLU/add fusion", dict(fold_bn=True, fuse_activations=True, channels_last=True, amp="",
                                          winograd=False)),
    ("+ Winograd 3x3 (= fp32)", dict(fold_bn=True, fuse_activations=True, channels_last=True, amp="", winograd=True)),
    ("+ bf16 autocast (= bf16)", dict(fold_bn=True, fuse_activations=True, channels_last=True, amp="bf16")),
)


def run_ablation(args) -> Dict[str, Any]:
    from maskrcnn.engine.speed import prepare_for_inference

    size = common.QUICK_IMAGE_SIZE if args.quick else common.IMAGE_SIZE
    repeats = args.repeats or 3
    info = common.machine_info()
    commit = common.git_commit()
    print(f"# inference ablation {info['date']} on {info['cpu']}, {info['threads']} threads, load "
          f"{info['load_avg_1min']}, image {size[0]}x{size[1]}, {repeats} alternated rounds, commit {commit}")
    image = common.load_image(size)
    resize = common.resize_setting(size)
    tv = common.build_torchvision(calib_image=image, size=resize)
    ours = common.build_ours(tv, size=resize)
    models = {"torchvision": tv}
    for name, kwargs in ABLATION:
        models[name] = prepare_for_inference(copy.deepcopy(ours), **kwargs)
    del ours
    with torch.no_grad():
        times = common.alternate({n: (lambda m=m: m([image])) for n, m in models.items()}, repeats=repeats,
                                 warmup=1, budget_s=args.budget)
    medians = {n: common.median(t) for n, t in times.items()}
    print("\n| variant | median | ratio ours/tv |\n|---|---|---|")
    for n, m in medians.items():
        print(f"| {n} | {common.fmt_s(m)} | {m / medians['torchvision']:.3f} |")
    return {"benchmark": "inference_ablation", "commit": commit, "machine": info, "image_size": list(size),
            "rows": [{"model": n, "median_s": m, "times_s": times[n], "ratio": m / medians["torchvision"]}
                     for n, m in medians.items()]}


# --- bf16 / int8 AP against fp32 --------------------------------------------------------------------------------------
#: The AP difference to fp32 (points) each reduced precision is allowed (the issues' goals).
AP_TOLERANCE = {"bf16": 0.5, "int8": 1.0}


def parse_ap_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference.py ap", description="COCO AP of a trained checkpoint in fp32 and "
                                "under bf16 autocast (TEST.AMP bf16 with fp32 box maths) and/or int8 "
                                "(TEST.QUANTIZE int8, calibrated on the first TEST.QUANTIZE_CALIB_IMAGES images, as "
                                "tools/test_net.py does); the differences asked for: bf16 within 0.5 AP points, int8 "
                                "within 1.0.")
    p.add_argument("--cfg", required=True, help="config the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="trained checkpoint (tools/train_net.py output)")
    p.add_argument("--dataset", default=None, help="dataset spec (default: the config's TEST.DATASETS[0])")
    p.add_argument("--modes", default="bf16", help="comma-separated subset of bf16,int8 (fp32 always runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--set", dest="set_cfgs", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


def run_ap(args) -> Dict[str, Any]:
    from maskrcnn.config import get_cfg
    from maskrcnn.data.catalog import build_dataset
    from maskrcnn.engine.inference import evaluate_on_dataset
    from maskrcnn.engine.quantize import calibration_images
    from maskrcnn.engine.speed import prepare_for_inference
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt

    cfg = get_cfg()
    cfg.merge_from_file(args.cfg)
    cfg.merge_from_list(args.set_cfgs)
    spec = args.dataset or (cfg.TEST.DATASETS[0] if cfg.TEST.DATASETS else None)
    if spec is None:
        raise SystemExit("no --dataset and the config has no TEST.DATASETS")
    dataset = build_dataset(spec, cfg.DATA_DIR, is_train=False)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in AP_TOLERANCE for m in modes):
        raise SystemExit(f"--modes: choose from {tuple(AP_TOLERANCE)}, got {modes}")
    results: Dict[str, Any] = {}
    for mode in ["fp32"] + modes:
        model = Generalized_RCNN(cfg)
        load_ckpt(model, args.ckpt, allow_class_mismatch=False)
        calib = calibration_images(dataset, cfg.TEST.QUANTIZE_CALIB_IMAGES) if mode == "int8" else None
        # autocast with the fp32 islands / the int8 body, as TEST.AMP / TEST.QUANTIZE would
        prepare_for_inference(model, cfg, amp="bf16" if mode == "bf16" else "",
                              quantize="int8" if mode == "int8" else "", calib_images=calib)
        t = time.perf_counter()
        metrics = evaluate_on_dataset(model, dataset, cfg, device="cpu", num_workers=0, log=lambda m: None)
        results[mode] = {"metrics": metrics, "seconds": time.perf_counter() - t}
    out: Dict[str, Any] = {"benchmark": "reduced_precision_ap", "dataset": spec, "ckpt": args.ckpt,
                           "results": results, "ap_difference": {}}
    for mode in modes:
        deltas = out["ap_difference"][mode] = {}
        tol = AP_TOLERANCE[mode]
        for iou_type in results["fp32"]["metrics"]:
            fp32, other = (results[m]["metrics"][iou_type]["AP"] for m in ("fp32", mode))
            deltas[iou_type] = other - fp32
            print(f"{iou_type}: AP fp32 {fp32:.2f}, {mode} {other:.2f}, difference {other - fp32:+.2f} "
                  f"({'within' if abs(other - fp32) <= tol else 'NOT within'} {tol})")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ap":
        args = parse_ap_args(argv[1:])
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_ap(args)
    else:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.child_memory:
            child_memory(args)
            return 0
        common.apply_tune_malloc(args.tune_malloc)
        result = run_ablation(args) if args.ablation else run(args)
    if args.json:
        common.write_json(args.json, result)
    # The fp32 identical-detections check fails the run (after the JSON is written, for the record).
    return 1 if result.get("identical_check_failed") else 0


if __name__ == "__main__":
    sys.exit(main())
