"""benchmarks/peak.py: the GEMM shapes follow the convolutions they stand for, and each dtype's probe runs."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import peak  # noqa: E402


def test_conv_shapes_match_their_names():
    # "resN kxk (HxW, Cin->Cout)": M = H*W, K = Cin*k*k, N = Cout.
    checked = 0
    for name, m, k, n, conv in peak.SHAPES:
        found = re.match(r".* (\d)x\1 .*\((\d+)x(\d+), (\d+)->(\d+)\)", name)
        if not found:
            assert conv is None, name
            continue
        ks, h, w, cin, cout = (int(v) for v in found.groups())
        assert (m, k, n) == (h * w, cin * ks * ks, cout), name
        # The convolution timed for the row computes the same number of multiply-adds as its product.
        ch, cw, ccin, ccout, ck = conv
        assert (ccin, ccout, ck) == (cin, cout, ks) and ch * cw == m, name
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_measure_runs(dtype):
    if dtype == "int8" and not peak.int8_available():
        pytest.skip("torch._int_mm is not available on this CPU build")
    assert peak.measure(64, 64, 64, dtype, repeats=1) > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_measure_conv_runs(dtype):
    assert peak.measure_conv((9, 7, 16, 8, 3), dtype, repeats=1) > 0
