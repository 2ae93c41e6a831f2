"""benchmarks/winograd_precision.py: its bf16-product Winograd computes the convolution (to bf16's rounding), and
the table orders the methods as the docs say (float32 Winograd near the direct convolution, bf16 products of the
larger tiles far from it)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import winograd_precision  # noqa: E402


@pytest.mark.parametrize("tile", [2, 3, 4, 5, 6])
def test_bf16_products_compute_the_convolution(tile):
    gen = torch.Generator().manual_seed(tile)
    x = torch.randn(2, 16, 11, 13, generator=gen).relu()
    w = torch.randn(8, 16, 3, 3, generator=gen) * 0.1
    ref = F.conv2d(x.double(), w.double(), padding=1)
    y = winograd_precision.winograd_bf16_products(x, w, tile)
    assert y.shape == ref.shape
    e = winograd_precision.errors(y, ref)
    assert e["rms"] < 0.1, e  # bf16's 8-bit mantissa, amplified by the tile's transforms


def test_table(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(winograd_precision, "SHAPES", [(1, 32, 20, 24)])
    assert winograd_precision.main(["--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    errs = {line.split(" | ")[1]: float(line.split(" | ")[3].rstrip(" |")) for line in out.splitlines()
            if line.startswith("| 32x32@")}
    assert len(errs) == 10 and (tmp_path / "p.json").exists()
    assert errs["direct fp32"] < 1e-6 and errs["winograd F(4x4) fp32"] < 1e-5
    assert errs["direct bf16"] < 1e-2
    # The larger the tile, the more its bf16 products round: F(2x2) near the direct bf16, F(6x6) ~10x it.
    assert errs["winograd F(2x2) bf16 products"] < 2 * errs["direct bf16"]
    assert errs["winograd F(6x6) bf16 products"] > 5 * errs["direct bf16"]
