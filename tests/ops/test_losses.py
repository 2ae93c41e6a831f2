import math

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.ops.losses import smooth_l1_loss


@pytest.mark.parametrize("beta", [1.0 / 9, 1.0, 0.5, 1e-3, 3.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_torch_smooth_l1(beta, reduction):
    x = (torch.randn(64, 4) * 0.5).double().requires_grad_()
    y = (torch.randn(64, 4) * 0.5).double().requires_grad_()
    ours = smooth_l1_loss(x, y, beta=beta, reduction=reduction)
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    ref = F.smooth_l1_loss(x2, y2, beta=beta, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.grad, y2.grad, rtol=0, atol=1e-12)


def test_float32_values_identical_to_torch():
    x, y = torch.randn(1000), torch.randn(1000)
    assert torch.equal(smooth_l1_loss(x, y, reduction="none"), F.smooth_l1_loss(x, y, beta=1.0 / 9, reduction="none"))


def test_defaults_are_detectron_beta_and_sum():
    x, y = torch.randn(10, 4), torch.randn(10, 4)
    ref = F.smooth_l1_loss(x, y, beta=1.0 / 9, reduction="sum")
    torch.testing.assert_close(smooth_l1_loss(x, y), ref)


def test_values_on_both_branches_and_at_the_boundary():
    beta = 0.5
    d = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 2.0])
    out = smooth_l1_loss(d, torch.zeros_like(d), beta=beta, reduction="none")
    expected = [0.0, 0.5 * 0.0625 / 0.5, 0.0625, 0.5 - 0.25, 0.25, 2.0 - 0.25]
    torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_beta_zero_is_l1(reduction):
    x = torch.randn(20, 4, requires_grad=True)
    y = torch.randn(20, 4)
    ours = smooth_l1_loss(x, y, beta=0.0, reduction=reduction)
    torch.testing.assert_close(ours, F.l1_loss(x, y, reduction=reduction))
    torch.testing.assert_close(ours, F.smooth_l1_loss(x, y, beta=0.0, reduction=reduction))
    ours.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_empty_inputs():
    x = torch.zeros(0, 4)
    assert smooth_l1_loss(x, x, reduction="sum").item() == 0.0
    assert math.isnan(smooth_l1_loss(x, x, reduction="mean").item())
    assert smooth_l1_loss(x, x, reduction="none").shape == (0, 4)


def test_invalid_arguments():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(x, x, beta=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        smooth_l1_loss(x, torch.zeros(3, 1))
