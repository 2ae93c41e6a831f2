"""TRAIN.WINOGRAD (maskrcnn/engine/winograd_training.py): the class swap keeps the model's contract, and a training
step with it has the losses and gradients of the plain model up to float rounding. Nothing here is timed."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from test_speed import _one_thread, _train_batch, tiny_model  # noqa: E402,F401

from maskrcnn.config import get_cfg  # noqa: E402
from maskrcnn.engine import speed  # noqa: E402
from maskrcnn.engine.frozen_bn_training import FoldedFrozenBatchNorm2d, FrozenBNConv2d  # noqa: E402
from maskrcnn.engine.winograd_training import (WinogradConv2d, WinogradFrozenBNConv2d,  # noqa: E402
                                               enable_winograd_training)
from maskrcnn.modeling.backbone.frozen_bn import FrozenBatchNorm2d  # noqa: E402


@pytest.fixture
def small_rule(monkeypatch):
    """The tiny model's maps are narrow (32 channels) and small: lower the rule's floors so that its 3x3
    convolutions take the Winograd path, and count the calls that do."""
    import maskrcnn.engine.winograd_training as wt
    import maskrcnn.ops.winograd as wino

    monkeypatch.setattr(wino, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(wino, "WINOGRAD_MIN_SIZE", 4)
    monkeypatch.setattr(wino, "WINOGRAD_MIN_PIXELS_PER_CHANNEL", 1)
    calls = []
    real, real_folded = wt.conv3x3_winograd_autograd, wt._ScaledWinogradConv.apply

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    def counted_folded(x, *args):
        calls.append(("folded",) + tuple(x.shape))
        return real_folded(x, *args)
    monkeypatch.setattr(wt, "conv3x3_winograd_autograd", counted)
    monkeypatch.setattr(wt._ScaledWinogradConv, "apply", counted_folded)
    return calls


def _two_models(backbone: bool):
    """The tiny model twice, the training features on, Winograd off and on (``backbone=False``: the body's folded
    3x3 convolutions stay with oneDNN)."""
    ref = tiny_model().train()
    fast = copy.deepcopy(ref)
    speed.prepare_for_training(ref, fold_bn=True, channels_last=True, winograd=False)
    speed.prepare_for_training(fast, fold_bn=True, channels_last=True, winograd=True)
    assert not any(type(m) in (WinogradConv2d, WinogradFrozenBNConv2d) for m in ref.modules())
    folded = [m for m in fast.modules() if type(m) is WinogradFrozenBNConv2d]
    assert folded  # every block's middle 3x3, and the stride-1 first ones of BasicBlocks
    if not backbone:
        for m in folded:
            m.__class__ = FrozenBNConv2d
    return ref, fast


def _plain_3x3(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d and tuple(m.kernel_size) == (3, 3)
            and tuple(m.stride) == (1, 1)]


def test_swap_keeps_parameters_keys_and_comes_back():
    model = tiny_model()
    names = _plain_3x3(model)
    assert any(n.startswith("RPN") for n in names) and any("mask_fcn" in n for n in names)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert enable_winograd_training(model) == len(names)
    swapped = [n for n, m in model.named_modules() if type(m) is WinogradConv2d]
    assert swapped == names and all(isinstance(model.get_submodule(n), nn.Conv2d) for n in swapped)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert enable_winograd_training(model) == 0  # nothing plain left
    assert enable_winograd_training(model, enabled=False) == len(names)
    assert _plain_3x3(model) == names and not any(type(m) is WinogradConv2d for m in model.modules())


def _step_and_compare(ref, fast, calls, grad_check):
    ims, targets = _train_batch()
    torch.manual_seed(5)
    loss_ref = ref(ims, targets)
    assert calls == []
    torch.manual_seed(5)
    loss_fast = fast(ims, targets)
    for k in loss_ref:
        torch.testing.assert_close(loss_fast[k], loss_ref[k], rtol=1e-4, atol=1e-5)
    sum(loss_ref.values()).backward()
    sum(loss_fast.values()).backward()
    checked = 0
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert (p_ref.grad is None) == (p_fast.grad is None), name
        if p_ref.grad is not None:
            grad_check(name, p_fast.grad, p_ref.grad)
            checked += 1
    assert checked > 20


def test_training_step_same_losses_and_gradients(small_rule):
    ref, fast = _two_models(backbone=False)
    # The FPN's output convolutions, the RPN's (per level) and the mask head's four.

    def exact(name, g, g_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-4 * max(float(g_ref.abs().max()), 1e-3), msg=name)
    _step_and_compare(ref, fast, small_rule, exact)
    assert len(small_rule) >= 4 and not any(c[0] == "folded" for c in small_rule)


def test_training_step_with_the_backbone(small_rule):
    """The body's folded 3x3 convolutions too (their ReLU and residual sum inside). The tiny model's activations
    reach 1e3, so a ReLU decision on a value within the rounding of zero may go the other way (with this seed one
    does, in res4.1: 3e-4 against 0); that moves the gradients of everything below it by about 5e-4 of their norm.
    The block's own gradients are exact (test_folded_conv_relu_*); here every parameter's gradient is within 2e-3
    of its norm (a wrong BN scale, filter flip or residual gradient is off by its whole size)."""
    ref, fast = _two_models(backbone=True)

    def close(name, g, g_ref):
        assert float((g - g_ref).norm()) <= 2e-3 * max(float(g_ref.norm()), 1e-6), name
    _step_and_compare(ref, fast, small_rule, close)
    assert sum(c[0] == "folded" for c in small_rule) >= 6


def _folded(c, bias, shift, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=bias)
    bn = FrozenBatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.fill_(shift)
    plain = FrozenBNConv2d(conv, FoldedFrozenBatchNorm2d.from_frozen(bn)).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    assert enable_winograd_training(nn.Sequential(fast)) == 1 and type(fast) is WinogradFrozenBNConv2d
    return plain, fast


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_other", [False, True])
@pytest.mark.parametrize("shift", [0.0, 50.0])  # 50: every output positive, the ReLU passes all
def test_folded_conv_relu_same_outputs_and_gradients(small_rule, bias, with_other, shift):
    plain, fast = _folded(8, bias, shift)
    x = torch.randn(2, 8, 11, 13).contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 8, 11, 13).contiguous(memory_format=torch.channels_last) if with_other else None
    g = torch.randn(2, 8, 11, 13)
    results = []
    for m in (plain, fast):
        xi = x.clone().requires_grad_()
        oi = other.clone().requires_grad_() if with_other else None
        y = m.conv_relu(xi, oi)
        y.backward(g)
        results.append([y, xi.grad, m.weight.grad] + ([m.bias.grad] if bias else []) + ([oi.grad] if with_other else []))
    assert small_rule == [("folded", 2, 8, 11, 13)]
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))
    assert (results[0][0] == 0).any() == (shift == 0.0)  # shift 0 has ReLU zeros: their mask is checked


def test_folded_forward_and_fallbacks(small_rule):
    plain, fast = _folded(8, True, 0.0)
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    y = fast(x)  # the un-fused forward (a block class without its own fused path calls it)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, plain(x), rtol=0, atol=1e-5 * float(y.detach().abs().max()))
    assert len(small_rule) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.conv_relu(x).dtype == torch.bfloat16  # oneDNN's bf16 path
    # The tap (a 1x1 conv1's) stays with oneDNN; without channels-last that runs the forward, then the ReLU in place.
    out, identity = fast.conv_relu(x.detach().contiguous(memory_format=torch.channels_last), tap=True)
    assert identity is not None and len(small_rule) == 1
    out, _ = fast.conv_relu(x, tap=True)
    out.sum().backward()
    assert len(small_rule) == 2
    assert enable_winograd_training(nn.Sequential(fast), enabled=False) == 1 and type(fast) is FrozenBNConv2d


def test_falls_back_where_the_rule_or_the_dtype_says_no(small_rule):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    enable_winograd_training(nn.Sequential(conv))
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    ref = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-5)
    assert len(small_rule) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # autocast's own convolution
    conv.double()(x.double())
    torch.jit.trace(conv.float(), x.detach(), check_trace=False)
    assert len(small_rule) == 1


def test_config_key_and_inference_restores_plain_convolutions():
    assert get_cfg().TRAIN.WINOGRAD is True
    off = tiny_model()
    cfg = off.cfg.clone()
    cfg.merge_from_list(["TRAIN.WINOGRAD", False])
    speed.prepare_for_training(off, cfg)
    assert not any(type(m) is WinogradConv2d for m in off.modules())
    # The body's 3x3 convolutions are FrozenBNConv2d (TRAIN.FUSE_FROZEN_BN); the FPN's and heads' stay plain.
    n = len(_plain_3x3(off))
    model = tiny_model()
    speed.prepare_for_training(model)  # the config defaults: TRAIN.WINOGRAD on
    assert n > 0 and sum(type(m) is WinogradConv2d for m in model.modules()) == n
    # train_net evaluates the model it trained: the inference features see plain convolutions again.
    speed.prepare_for_inference(model, fold_bn=True, fuse_activations=True, channels_last=True, amp="")
    assert not any(type(m) is WinogradConv2d for m in model.modules())
