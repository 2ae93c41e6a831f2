"""Draw training curves from runs' ``metrics.jsonl``: ``maskrcnn-plot``, or ``python tools/plot_curves.py`` in a
checkout.

    maskrcnn-plot output/demo                                   # -> output/demo/curves.png
    maskrcnn-plot output/run_sgd output/run_adamw -o compare.png  # several runs on the same axes

Each argument is a training output folder (or its ``metrics.jsonl``). The figure has three panels against the
iteration: the training loss (with one run, every loss; with several, each run's total), the evaluation AP
(``bbox/AP``, ``segm/AP`` of the runs trained with ``TEST.EVAL_PERIOD``) and the learning rate. Needs matplotlib
(``pip install 'maskrcnn[plot]'``).

Exit status: 0 done, 1 matplotlib missing, 2 bad command line or a run without metrics.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Draw loss and AP curves of training runs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="training output folder(s) or metrics.jsonl file(s)")
    p.add_argument("-o", "--output", default=None,
                   help="PNG to write (default: OUTPUT_DIR/curves.png for one run, ./curves.png for several)")
    p.add_argument("--title", default="", help="figure title")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..engine.metrics import read_metrics
    from ..utils.curves import PlotUnavailable, plot_curves, run_labels

    runs = []
    for path, label in zip(args.runs, run_labels(args.runs)):
        try:
            records = read_metrics(path)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        runs.append((label, records))
    output = args.output
    if output is None:
        first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(os.path.abspath(args.runs[0]))
        output = os.path.join(first, "curves.png") if len(args.runs) == 1 else "curves.png"
    try:
        data = plot_curves(runs, output, title=args.title)
    except PlotUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_eval = sum(len(xs) for xs, _ in data["AP"].values())
    print(f"wrote {output}: {len(runs)} run(s), {len(data['loss'])} loss and {len(data['AP'])} AP curve(s) "
          f"({n_eval} evaluation points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
