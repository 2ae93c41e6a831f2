"""benchmarks/kernels.py: each row's two callables compute the same thing, so that its ratio compares like with like."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import kernels  # noqa: E402


def test_winograd_rows_compute_the_fused_convolution_and_name_the_rule(monkeypatch):
    # Small stand-ins for the model's shapes: two the rule takes, one too narrow and one too small for it.
    # The taken ones with the tile winograd_tile picks, then those against F(4x4).
    monkeypatch.setattr(kernels, "WINOGRAD", [(1, 256, 15, 19), (2, 64, 16, 16), (3, 256, 8, 8), (1, 256, 32, 36)])
    rows = kernels.winograd_rows(torch.Generator().manual_seed(0))
    assert list(rows) == ["winograd 3x3 fp32 256x256@1x15x19 F(5x5)",
                          "winograd 3x3 fp32 64x64@2x16x16 F(4x4) (not taken)",
                          "winograd 3x3 fp32 256x256@3x8x8 F(4x4) (not taken)",
                          "winograd 3x3 fp32 256x256@1x32x36 F(6x6)",
                          "winograd F(5x5) against F(4x4) 256x256@1x15x19",
                          "winograd F(6x6) against F(4x4) 256x256@1x32x36"]
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


def _same_gradients(rows):
    for name, (before, now) in rows.items():
        a = [g.clone() for g in before()]
        b = now()
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=0, atol=2e-5 * float(ga.abs().max()), msg=name)


def test_winograd_train_rows_compute_the_same_gradients(monkeypatch):
    monkeypatch.setattr(kernels, "WINOGRAD_TRAIN", [(3, 256, 16, 16), (2, 256, 16, 20), (1, 256, 14, 14)])
    rows = kernels.winograd_train_rows(torch.Generator().manual_seed(0))
    # 3x16x16 = 768 pixels, 3 per channel: the training rule's floor; 2x16x20 has 2.5, 1x14x14 0.8.
    assert list(rows) == ["winograd train 3x3 fp32 256x256@3x16x16 F(4x4)",
                          "winograd train 3x3 fp32 256x256@2x16x20 F(4x4) (not taken)",
                          "winograd train 3x3 fp32 256x256@1x14x14 F(5x5) (not taken)"]
    _same_gradients(rows)


def test_winograd_backbone_rows_compute_the_same_gradients(monkeypatch):
    # 128 channels at 2x16x16 (512 pixels, 4 per channel) is below the narrow rule's 128: not taken.
    monkeypatch.setattr(kernels, "WINOGRAD_TRAIN_BACKBONE", [(3, 256, 16, 16), (2, 128, 16, 16)])
    rows = kernels.winograd_backbone_rows(torch.Generator().manual_seed(0))
    assert list(rows) == ["winograd train backbone 3x3+ReLU fp32 256x256@3x16x16 F(4x4)",
                          "winograd train backbone 3x3+ReLU fp32 128x128@2x16x16 F(4x4) (not taken)"]
    _same_gradients(rows)


def test_tap_rows_compute_the_same_weight_gradient(monkeypatch):
    monkeypatch.setattr(kernels, "TAPS", [(2, 8, 11, 14)])
    (before, now), = kernels.tap_rows(torch.Generator().manual_seed(0)).values()
    a, b = before(), now()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))
