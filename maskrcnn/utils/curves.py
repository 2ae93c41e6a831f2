"""Training curves from ``metrics.jsonl`` records: loss, AP and learning rate against the iteration, one run or
several on the same axes (``maskrcnn-plot``, ``tools/plot_curves.py``).

matplotlib is an optional extra (``pip install 'maskrcnn[plot]'``), imported only when a figure is drawn; it draws
with the Agg canvas (no display, no pyplot global state).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

__all__ = ["PlotUnavailable", "run_labels", "curve_data", "plot_curves"]

#: Panel name -> series label -> (iterations, values).
CurveData = Dict[str, Dict[str, Tuple[List[int], List[float]]]]

PANELS = ("loss", "AP", "lr")


class PlotUnavailable(RuntimeError):
    """A plot was asked for but matplotlib is not installed."""


def run_labels(paths: Sequence[str]) -> List[str]:
    """Short distinct names for runs: each folder's name, or its path relative to the common folder when two runs
    share a name (``a/out`` and ``b/out`` -> ``a/out``, ``b/out``)."""
    norm = [os.path.normpath(os.path.abspath(p)) for p in paths]
    norm = [os.path.dirname(p) if os.path.isfile(p) else p for p in norm]
    names = [os.path.basename(p) or p for p in norm]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath(norm) if len(norm) > 1 else os.path.dirname(norm[0])
    rel = [os.path.relpath(p, common) if p != common else os.path.basename(p) for p in norm]
    return rel if len(set(rel)) == len(rel) else norm


def _series(records: Sequence[Mapping[str, Any]], kind: str, key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("type") != kind or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if math.isnan(float(v)) or math.isinf(float(v)):
            continue
        xs.append(int(r["iteration"]))
        ys.append(float(v))
    return xs, ys


def curve_data(runs: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]]) -> CurveData:
    """What :func:`plot_curves` draws, per panel: ``loss`` (each run's ``total_loss``; with a single run also every
    ``loss_*``), ``AP`` (every evaluation key ending in ``/AP``: ``bbox/AP``, ``segm/AP``), ``lr``. Series are
    labelled ``"<run>: <key>"`` when several runs share a panel, else by the key."""
    several = len(runs) > 1
    data: CurveData = {p: {} for p in PANELS}

    def add(panel: str, run: str, key: str, series):
        if series[0]:
            data[panel][f"{run}: {key}" if several else key] = series

    for run, records in runs:
        add("loss", run, "total_loss", _series(records, "train", "total_loss"))
        if not several:
            keys = sorted({k for r in records if r.get("type") == "train" for k in r if k.startswith("loss")})
            for k in keys:
                add("loss", run, k, _series(records, "train", k))
        ap_keys = sorted({k for r in records if r.get("type") == "eval" for k in r if k.endswith("/AP")})
        for k in ap_keys:
            add("AP", run, k, _series(records, "eval", k))
        add("lr", run, "lr", _series(records, "train", "lr"))
    return data


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise PlotUnavailable(f"drawing curves needs matplotlib, which is not installed ({e}); install it with "
                              f"`pip install matplotlib` (or `pip install 'maskrcnn[plot]'`)") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def plot_curves(runs: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]], output: str, title: str = "",
                dpi: int = 100) -> CurveData:
    """Draw loss, AP and lr against the iteration for ``runs`` (``(label, metrics.jsonl records)``) into the PNG
    ``output`` (folders created); returns the data drawn (:func:`curve_data`). Raises :class:`PlotUnavailable`
    without matplotlib, ``ValueError`` when no run has a training record."""
    if not runs:
        raise ValueError("plot_curves: no runs given")
    data = curve_data(runs)
    if not data["loss"]:
        raise ValueError(f"plot_curves: no training records in {', '.join(label for label, _ in runs)} (nothing "
                         f"logged yet?)")
    Figure, FigureCanvasAgg, MaxNLocator = _import_matplotlib()
    fig = Figure(figsize=(15, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharex=True)  # one iteration axis: loss, AP and lr line up
    titles = {"loss": "training loss (median over the log period)", "AP": "evaluation AP (%)",
              "lr": "learning rate"}
    for ax, panel in zip(axes, PANELS):
        for label, (xs, ys) in data[panel].items():
            thin = panel == "loss" and len(runs) == 1 and label != "total_loss"
            ax.plot(xs, ys, label=label, marker="o" if panel == "AP" else None, markersize=3,
                    linewidth=0.8 if thin else 1.6, alpha=0.7 if thin else 1.0)
        ax.set_title(titles[panel])
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if data[panel]:
            ax.legend(fontsize=7)
        elif panel == "AP":
            ax.text(0.5, 0.5, "no evaluation records\n(train with TEST.EVAL_PERIOD > 0)", ha="center",
                    va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, format="png")
    return data
