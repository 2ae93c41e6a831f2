"""Bar chart of the time ratios ours / torchvision (OpenCV; matplotlib is not a dependency) and a markdown table.

    python benchmarks/plot.py RESULTS.json [--out docs/benchmarks_ratios.png]

``RESULTS.json`` is what ``run_all.py`` writes. Each bar is one measured ratio (lower is better); the dashed line
across a bar is the issue's target for it, the grey line is parity (1.0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_OUT = os.path.join(ROOT, "docs", "benchmarks_ratios.png")

#: The ratios the issue (#14) sets goals for: (label, benchmark, ours run, competitor, target). The competitor
#: "best fp32" is torchvision's faster fp32 setting in the same run (plain or channels-last).
TARGETS = (
    ("inference fp32", "inference", "ours-fp32", "best fp32", 0.60),
    ("inference bf16", "inference", "ours-bf16", "torchvision bf16+channels-last", 0.45),
    ("inference int8", "inference", "ours-int8", "torchvision bf16+channels-last", 0.25),
    ("training fp32", "train_step", "ours-fp32", "best fp32", 0.60),
    ("training bf16", "train_step", "ours-bf16", "torchvision bf16+channels-last", 0.45),
)
TV_FP32 = ("torchvision plain", "torchvision channels-last")


def _rows(bench: Dict[str, Any], key: str) -> Dict[str, Dict[str, Any]]:
    """``{run name: row}`` of one row set: inference rows of set ``key`` (e.g. 'score>=0'), all training rows."""
    if bench.get("benchmark") == "train_step":
        return {r["model"]: r for r in bench["rows"]}
    return {r["model"].split(" @")[0]: r for r in bench["rows"] if r["model"].endswith(" @" + key)}


def measured(results: Dict[str, Any], key: str = "score>=0") -> List[Dict[str, Any]]:
    """One dict per goal ratio measured in ``results`` (inference rows of set ``key``): label, ours, competitor
    (name, median), the ratio of medians, its spread over the alternated rounds (min-max of the per-round ratios),
    and the target."""
    out = []
    for label, bench_name, ours, comp, target in TARGETS:
        bench = results.get(bench_name)
        if not bench:
            continue
        rows = _rows(bench, key)
        if comp == "best fp32":
            present = [n for n in TV_FP32 if n in rows]
            comp = min(present, key=lambda n: rows[n]["median_s"]) if present else comp
        if ours not in rows or comp not in rows:
            continue
        a, b = rows[ours], rows[comp]
        per_round = [x / y for x, y in zip(a["times_s"], b["times_s"])]
        out.append({"label": label, "ours": ours, "competitor": comp, "ours_s": a["median_s"],
                    "competitor_s": b["median_s"], "ratio": a["median_s"] / b["median_s"],
                    "spread": (min(per_round), max(per_round)), "rounds": len(per_round), "target": target,
                    "memory": (a.get("peak_memory_bytes"), b.get("peak_memory_bytes"))})
    return out


def ratios(results: Dict[str, Any]) -> List[Tuple[str, float, float]]:
    """``(label, ratio, target)`` of every measured goal ratio, in TARGETS order."""
    return [(m["label"], m["ratio"], m["target"]) for m in measured(results)]


def draw(bars: List[Tuple[str, float, float]], title: str, subtitle: str) -> np.ndarray:
    w, h = 1100, 520
    left, right, top, bottom = 90, 40, 90, 80
    img = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (left, 36), font, 0.75, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(img, subtitle, (left, 64), font, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    y_max = max([1.2] + [r * 1.1 for _, r, _ in bars])
    plot_h = h - top - bottom

    def y_of(v: float) -> int:
        return int(round(top + plot_h * (1.0 - v / y_max)))

    # Axis with ticks every 0.2.
    cv2.line(img, (left, top), (left, h - bottom), (0, 0, 0), 1)
    cv2.line(img, (left, h - bottom), (w - right, h - bottom), (0, 0, 0), 1)
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        cv2.line(img, (left - 5, y), (left, y), (0, 0, 0), 1)
        cv2.putText(img, f"{tick:.1f}", (left - 45, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tick += 0.2
    cv2.putText(img, "time ours / torchvision", (8, top - 14), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(img, (left, y_of(1.0)), (w - right, y_of(1.0)), (160, 160, 160), 1, cv2.LINE_AA)
    cv2.putText(img, "parity", (w - right - 55, y_of(1.0) - 6), font, 0.45, (120, 120, 120), 1, cv2.LINE_AA)

    n = max(len(bars), 1)
    slot = (w - left - right) / n
    bar_w = int(slot * 0.5)
    for i, (label, ratio, target) in enumerate(bars):
        cx = int(left + slot * (i + 0.5))
        met = ratio <= target
        color = (80, 170, 60) if met else (60, 80, 220)  # BGR: green when the target is met, red otherwise
        cv2.rectangle(img, (cx - bar_w // 2, y_of(ratio)), (cx + bar_w // 2, h - bottom), color, -1)
        # Inside the bar, below its top: above it the label would cross a nearby target line.
        cv2.putText(img, f"{ratio:.2f}", (cx - 22, y_of(ratio) + 26), font, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        ty = y_of(target)
        for x in range(cx - bar_w // 2 - 12, cx + bar_w // 2 + 12, 10):
            cv2.line(img, (x, ty), (min(x + 6, cx + bar_w // 2 + 12), ty), (0, 0, 0), 2)
        cv2.putText(img, f"target {target:.2f}", (cx + bar_w // 2 + 16, ty + 5), font, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
        size = cv2.getTextSize(label, font, 0.55, 1)[0]
        cv2.putText(img, label, (cx - size[0] // 2, h - bottom + 28), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "fp32: vs torchvision's faster fp32 setting; bf16, int8: vs torchvision bf16 autocast + "
                "channels-last", (left, h - 18), font, 0.42, (80, 80, 80), 1, cv2.LINE_AA)
    return img


def markdown(results: Dict[str, Any]) -> str:
    lines = ["| measurement | ours | competitor | ratio (median) | ratio spread over rounds | target | "
             "peak memory ours / competitor |", "|---|---|---|---|---|---|---|"]
    sets = (results.get("inference") or {}).get("sets") or ["score>=0"]
    for key in sets:
        for m in measured(results, key):
            if m["label"].startswith("training") and key != sets[0]:
                continue
            where = f" ({key})" if m["label"].startswith("inference") else ""
            mem = "-"
            if all(m["memory"]):
                mem = f"{m['memory'][0] / 2 ** 20:.0f} / {m['memory'][1] / 2 ** 20:.0f} MiB"
            lines.append(f"| {m['label']}{where} | {m['ours']} {m['ours_s']:.3f} s | {m['competitor']} "
                         f"{m['competitor_s']:.3f} s | {m['ratio']:.3f} | {m['spread'][0]:.3f}-{m['spread'][1]:.3f} "
                         f"({m['rounds']} rounds) | <= {m['target']:.2f} | {mem} |")
    aps = results.get("reduced_precision_ap") or results.get("bf16_ap") or []
    for ap in aps if isinstance(aps, list) else [aps]:
        diffs = ap["ap_difference"]
        if "bf16" in ap["results"] and not isinstance(next(iter(diffs.values())), dict):
            diffs = {"bf16": diffs}  # the older one-mode layout
        for mode, per_type in diffs.items():
            for iou_type, diff in per_type.items():
                fp32 = ap["results"]["fp32"]["metrics"][iou_type]["AP"]
                other = ap["results"][mode]["metrics"][iou_type]["AP"]
                tol = {"bf16": 0.5, "int8": 1.0}.get(mode, 0.5)
                lines.append(f"| {mode} {iou_type} AP ({ap['dataset']}) | {other:.2f} | fp32 {fp32:.2f} | "
                             f"{diff:+.2f} points | - | within {tol} | - |")
    goals = (results.get("train_step") or {}).get("goal_lines") or []
    if goals:  # what each training goal asks of this machine (train_step.goal_lines)
        lines += [""] + [f"- {g}" for g in goals]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="JSON written by run_all.py")
    p.add_argument("--out", default=DEFAULT_OUT, help="PNG to write")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    bars = ratios(results)
    if not bars:
        print(f"{args.results} holds no ratios", file=sys.stderr)
        return 1
    machine = next((results[k]["machine"] for k in ("inference", "train_step") if results.get(k)), {})
    subtitle = (f"{machine.get('date', '?')}, {machine.get('cpu', '?')}, {machine.get('threads', '?')} threads, "
                f"torch {machine.get('torch', '?')}; medians of alternated runs")
    img = draw(bars, "Mask R-CNN R-50-FPN on the CPU: ours / torchvision (lower is faster)", subtitle)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not cv2.imwrite(args.out, img):
        raise OSError(f"could not write {args.out}")
    print(markdown(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
