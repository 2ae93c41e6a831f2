"""What a 3x3 convolution rounds: direct and Winograd F(m x m, 3x3), m = 2..6, with float32 or bf16 products.

    python benchmarks/winograd_precision.py [--json OUT]

Why bf16 inference keeps oneDNN's direct convolution (``conv3x3_winograd`` is float32 only): Winograd needs fewer
multiplications, but its transforms scale values by up to 8 (F(4x4)) and more, then subtract nearly equal sums,
so the rounding of the transform-domain products comes back amplified. This script convolves a ReLU'd random map
with a He-scaled random 256x256 filter (R-50-FPN's FPN/RPN shapes: one 50x68 map; the mask head's: 100 RoIs of
14x14) and prints each result's error against a float64 direct convolution, as its largest element and its
root-mean-square, both relative to the reference's (largest, rms):

- ``direct fp32`` / ``direct bf16``: ``F.conv2d`` in float32, and on bf16 input and weight (oneDNN, float32
  sums, bf16 output), what ``TEST.AMP bf16`` runs;
- ``winograd F(m) fp32``: :func:`maskrcnn.ops.conv3x3_winograd` (m = 4, 5, 6, what ``TEST.WINOGRAD`` offers);
- ``winograd F(m) bf16 products``: the same tiles and transforms in float32, the transformed input and weight
  rounded to bf16 and multiplied by ``torch.bmm`` in bf16 (float32 sums, bf16 output), as a bf16 Winograd would.
  m = 2 and 3 included (their matrices are ``maskrcnn.ops.winograd._transforms``'s, not offered as tiles).

Numbers only, no timing. Seeded: the same figures on every run of one torch build.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import common  # noqa: E402
from maskrcnn.ops import winograd as W  # noqa: E402

#: (N, C, H, W): one FPN level of an 800x1066 image (P4), and the mask head's 100 RoIs.
SHAPES = [(1, 256, 50, 68), (100, 256, 14, 14)]


def winograd_bf16_products(x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
    """``conv2d(x, weight, padding=1)`` by F(tile x tile, 3x3): transforms in float32, the products in bf16."""
    n, c, h, w = x.shape
    cout = weight.shape[0]
    a = tile + 2
    u = W._transform_filters(weight.permute(2, 3, 1, 0), tile, torch.float64).to(torch.bfloat16)
    tiled = W._TiledInput(x, tile, cout)
    _, _, at = W._transforms(tile)
    at = at.float()
    out = torch.empty(n, tile * tiled.th, tile * tiled.tw, cout)
    for b0, nb, r0, r in tiled.chunks():
        t = nb * r * tiled.tw
        m = torch.bmm(tiled.transform(b0, nb, r0, r).to(torch.bfloat16), u).float()
        g = (at @ m.view(a, a * t * cout)).view(tile, a, t * cout)
        y = torch.bmm(at.expand(tile, tile, a), g)
        out[b0:b0 + nb, tile * r0:tile * (r0 + r)].view(nb, r, tile, tiled.tw, tile, cout).copy_(
            y.view(tile, tile, nb, r, tiled.tw, cout).permute(2, 3, 0, 4, 1, 5))
    return out[:, :h, :w].permute(0, 3, 1, 2)


def errors(y: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    d = y.double() - ref
    return {"max": float(d.abs().max() / ref.abs().max()),
            "rms": float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    results = {}
    print(f"# winograd precision, torch {torch.__version__}, commit {common.git_commit()}")
    print("\n| shape | method | max error / max | rms error / rms |\n|---|---|---|---|")
    for n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w, generator=gen).relu()
        weight = torch.randn(c, c, 3, 3, generator=gen) * (2.0 / (9 * c)) ** 0.5
        ref = F.conv2d(x.double(), weight.double(), padding=1)
        rows = {"direct fp32": F.conv2d(x, weight, padding=1),
                "direct bf16": F.conv2d(x.bfloat16(), weight.bfloat16(), padding=1)}
        for tile in W.WINOGRAD_TILES:
            rows[f"winograd F({tile}x{tile}) fp32"] = W.conv3x3_winograd(x, W.winograd_weight(weight, tile))
        for tile in (2, 3) + W.WINOGRAD_TILES:
            rows[f"winograd F({tile}x{tile}) bf16 products"] = winograd_bf16_products(x, weight, tile)
        shape = f"{c}x{c}@{n}x{h}x{w}"
        for name, y in rows.items():
            e = errors(y, ref)
            results[f"{shape} {name}"] = e
            print(f"| {shape} | {name} | {e['max']:.2e} | {e['rms']:.2e} |")
    if args.json:
        common.write_json(args.json, {"benchmark": "winograd_precision", "commit": common.git_commit(),
                                      "machine": common.machine_info(), "errors": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
