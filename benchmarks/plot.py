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

#: (label, target ratio) per bar key.
TARGETS = {
    "inference_fp32": ("inference fp32", 0.77),
    "inference_bf16": ("inference bf16*", 0.40),
    "train_step": ("training step", 0.85),
}


def ratios(results: Dict[str, Any]) -> List[Tuple[str, float, float]]:
    """``(label, ratio, target)`` of every measured bar, in TARGETS order."""
    found: Dict[str, float] = {}
    inf = results.get("inference")
    if inf:
        for row in inf["rows"]:
            if row["model"].startswith("ours-") and row.get("score_thresh", 0.0) == 0.0:
                found[f"inference_{row['model'].split(' @')[0][5:]}"] = row["ratio"]
    train = results.get("train_step")
    if train:
        for row in train["rows"]:
            if row["model"] == "ours-fp32":
                found["train_step"] = row["ratio"]
    return [(TARGETS[k][0], found[k], TARGETS[k][1]) for k in TARGETS if k in found]


def draw(bars: List[Tuple[str, float, float]], title: str, subtitle: str) -> np.ndarray:
    w, h = 900, 520
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
    cv2.putText(img, "* bf16: ours under bf16 autocast vs torchvision fp32", (left, h - 18), font, 0.42,
                (80, 80, 80), 1, cv2.LINE_AA)
    return img


def markdown(results: Dict[str, Any]) -> str:
    lines = ["| measurement | ours | torchvision | ratio | target | peak memory ours / torchvision |",
             "|---|---|---|---|---|---|"]
    for key, bench in (("inference", results.get("inference")), ("train_step", results.get("train_step"))):
        if not bench:
            continue
        # Today's rows: ours against torchvision plain (score threshold 0 for inference); fair ratios below.
        rows = {r["model"].split(" @")[0]: r for r in bench["rows"] if r.get("score_thresh", 0.0) == 0.0}
        tv = rows["torchvision plain"]
        for name, row in rows.items():
            if not name.startswith("ours-") or (key == "train_step" and name != "ours-fp32"):
                continue
            label = f"inference {name[5:]}" if key == "inference" else "training step (batch 2)"
            target = TARGETS["inference_" + name[5:] if key == "inference" else "train_step"][1]
            mem = "-"
            if "peak_memory_bytes" in row and "peak_memory_bytes" in tv:
                mem = f"{row['peak_memory_bytes'] / 2 ** 20:.0f} / {tv['peak_memory_bytes'] / 2 ** 20:.0f} MiB"
            lines.append(f"| {label} | {row['median_s']:.2f} s | {tv['median_s']:.2f} s | {row['ratio']:.3f} | "
                         f"<= {target:.2f} | {mem} |")
    for key in ("inference", "train_step"):
        fair = (results.get(key) or {}).get("ratios") or {}
        for thr, rs in (fair.items() if key == "inference" else [("-", fair)]):
            for name, v in rs.items():
                lines.append(f"| {key} ratio {name}" + (f" ({thr})" if key == "inference" else "")
                             + f" | - | - | {v:.3f} | - | - |")
    ap = results.get("bf16_ap")
    if ap:
        for iou_type, diff in ap["ap_difference"].items():
            fp32 = ap["results"]["fp32"]["metrics"][iou_type]["AP"]
            bf16 = ap["results"]["bf16"]["metrics"][iou_type]["AP"]
            lines.append(f"| bf16 {iou_type} AP ({ap['dataset']}) | {bf16:.2f} | fp32: {fp32:.2f} | "
                         f"{diff:+.2f} points | within 0.5 | - |")
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
