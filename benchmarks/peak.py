"""Matmul peaks of this CPU at the matrix sizes R-50-FPN's convolutions really use: fp32, bf16 and int8.

    python benchmarks/peak.py [--threads N] [--repeats 5] [--json OUT]

A convolution with ``C_in`` inputs, ``C_out`` outputs, a ``k x k`` kernel and an ``H x W`` output is, as oneDNN
computes it, a product of an ``(H*W, C_in*k*k)`` matrix by a ``(C_in*k*k, C_out)`` one. For the layers that hold
most of the model's FLOPs at 800x1066 (each ResNet stage's 3x3 and 1x1 convolutions, an FPN output convolution,
the RPN convolution on P2, the mask head's 3x3 convolution over 100 RoIs of 14x14, fc6 over 1000 RoIs) this
script times ``torch.mm`` of those shapes in fp32 and bf16 and ``torch._int_mm`` (int8 x int8 -> int32) where
torch has it on the CPU, and, for the convolutions, the convolution itself with the kernels the models run
(``common.conv_runner``: oneDNN in fp32 and bf16, the x86 quantized engine in int8), best of ``--repeats`` after a
warm-up, next to the square 4096^3 product. GFLOP/s (GOP/s for int8) per shape. ``torch.mm`` goes to MKL in fp32,
which on an AMD CPU ran slower than oneDNN's convolutions of the same sizes: the inference benchmark's "of peak"
columns take the better of the 4096^3 product and the P2 convolution (``common.compute_peak``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

#: (name, M, K, N, conv) of the matrix products: M = output pixels (or RoIs), K = C_in * k * k, N = C_out; conv =
#: the (H, W, C_in, C_out, k) convolution the product stands for (batch 1), None for the plain products and the
#: mask head (100 separate 14x14 maps, which one batch-1 map would not stand for).
SHAPES: Tuple[Tuple[str, int, int, int, Optional[Tuple[int, int, int, int, int]]], ...] = (
    ("square 4096^3", 4096, 4096, 4096, None),
    ("res2 3x3 (200x267, 64->64)", 200 * 267, 64 * 9, 64, (200, 267, 64, 64, 3)),
    ("res3 3x3 (100x134, 128->128)", 100 * 134, 128 * 9, 128, (100, 134, 128, 128, 3)),
    ("res4 3x3 (50x67, 256->256)", 50 * 67, 256 * 9, 256, (50, 67, 256, 256, 3)),
    ("res5 3x3 (25x34, 512->512)", 25 * 34, 512 * 9, 512, (25, 34, 512, 512, 3)),
    ("res4 1x1 expand (50x67, 256->1024)", 50 * 67, 256, 1024, (50, 67, 256, 1024, 1)),
    ("FPN/RPN 3x3 on P2 (200x267, 256->256)", 200 * 267, 256 * 9, 256, (200, 267, 256, 256, 3)),
    ("mask head 3x3 (100 RoIs x 14x14, 256->256)", 100 * 196, 256 * 9, 256, None),
    ("box head fc6 (1000 RoIs, 12544->1024)", 1000, 12544, 1024, None),
)


#: The dtypes measured, by name.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def measure(m: int, k: int, n: int, dtype: str, repeats: int) -> float:
    """GFLOP/s (2*m*k*n per product) of one ``(m, k) @ (k, n)`` product in ``dtype`` (a name of :data:`DTYPES`)."""
    return common.matmul_peak(DTYPES[dtype], n=n, m=m, k=k, repeats=repeats)


def measure_conv(geometry: Tuple[int, int, int, int, int], dtype: str, repeats: int) -> float:
    """GFLOP/s of the convolution ``geometry`` (H, W, C_in, C_out, k) with the models' kernels
    (:func:`common.conv_runner`), best of ``repeats``."""
    run, flops = common.conv_runner(DTYPES[dtype], geometry)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def int8_available() -> bool:
    try:
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["fp32", "bf16"] + (["int8"] if int8_available() else [])
    info = common.machine_info()
    print(f"# matmul peaks {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads, load "
          f"{info['load_avg_1min']}, capability {info['capability']}), torch {info['torch']}, best of "
          f"{args.repeats}" + ("" if "int8" in dtypes else "; torch._int_mm unavailable here: no int8 column"))
    rows: List[Dict] = []
    print("\n| product (M x K x N) | " + " | ".join(f"{d} GFLOP/s mm / conv" for d in dtypes) + " |")
    print("|---|" + "---|" * len(dtypes))
    for name, m, k, n, conv in SHAPES:
        row = {"name": name, "m": m, "k": k, "n": n, "conv": conv}
        row.update({d: measure(m, k, n, d, args.repeats) for d in dtypes})
        if conv is not None:
            row.update({f"{d}_conv": measure_conv(conv, d, args.repeats) for d in dtypes})
        rows.append(row)
        print(f"| {name} ({m} x {k} x {n}) | " + " | ".join(
            f"{row[d]:.0f} / " + (f"{row[d + '_conv']:.0f}" if conv is not None else "-") for d in dtypes) + " |",
            flush=True)
    if args.json:
        common.write_json(args.json, {"benchmark": "peak", "machine": info, "commit": common.git_commit(),
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
