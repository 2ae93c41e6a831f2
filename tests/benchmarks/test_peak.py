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
    for name, m, k, n in peak.SHAPES:
        found = re.match(r".* (\d)x\1 .*\((\d+)x(\d+), (\d+)->(\d+)\)", name)
        if not found:
            continue
        ks, h, w, cin, cout = (int(v) for v in found.groups())
        assert (m, k, n) == (h * w, cin * ks * ks, cout), name
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_measure_runs(dtype):
    if dtype == "int8" and not peak.int8_available():
        pytest.skip("torch._int_mm is not available on this CPU build")
    assert peak.measure(64, 64, 64, dtype, repeats=1) > 0
