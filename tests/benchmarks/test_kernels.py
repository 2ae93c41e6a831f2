"""benchmarks/kernels.py: each row's two callables compute the same thing, so that its ratio compares like with like."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import kernels  # noqa: E402


def test_winograd_rows_compute_the_fused_convolution_and_name_the_rule(monkeypatch):
    # Small stand-ins for the model's shapes: one the rule takes, one too narrow and one too small for it.
    monkeypatch.setattr(kernels, "WINOGRAD", [(1, 256, 16, 20), (2, 64, 16, 16), (3, 256, 8, 8)])
    rows = kernels.winograd_rows(torch.Generator().manual_seed(0))
    assert list(rows) == ["winograd 3x3 fp32 256x256@1x16x20", "winograd 3x3 fp32 64x64@2x16x16 (not taken)",
                          "winograd 3x3 fp32 256x256@3x8x8 (not taken)"]
    for name, (before, now) in rows.items():
        a, b = before(), now()
        assert a.shape == b.shape and (a >= 0).all() and (b >= 0).all(), name  # both with the ReLU
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()))


def test_pointwise_rows_compute_the_same_gradients(monkeypatch):
    monkeypatch.setattr(kernels, "POINTWISE", [(16, 8, 6, 5)])
    for dtype in (torch.float32, torch.bfloat16):
        (before, now), = kernels.pointwise_rows(torch.Generator().manual_seed(0), dtype).values()
        (gx_a, gw_a, _), (gx_b, gw_b, _) = before(), now()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gx_b.float(), gx_a.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(gw_b.float(), gw_a.float(), rtol=tol, atol=tol)
