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
from maskrcnn.engine.winograd_training import WinogradConv2d, enable_winograd_training  # noqa: E402


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
    real = wt.conv3x3_winograd_autograd

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)
    monkeypatch.setattr(wt, "conv3x3_winograd_autograd", counted)
    return calls


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


def test_training_step_same_losses_and_gradients(small_rule):
    ref = tiny_model().train()
    fast = copy.deepcopy(ref)
    speed.prepare_for_training(ref, fold_bn=True, channels_last=True, winograd=False)
    speed.prepare_for_training(fast, fold_bn=True, channels_last=True, winograd=True)
    assert not any(type(m) is WinogradConv2d for m in ref.modules())
    ims, targets = _train_batch()
    torch.manual_seed(5)
    loss_ref = ref(ims, targets)
    assert small_rule == []
    torch.manual_seed(5)
    loss_fast = fast(ims, targets)
    # The FPN's output convolutions, the RPN's (per level) and the mask head's four took it.
    assert len(small_rule) >= 4
    for k in loss_ref:
        torch.testing.assert_close(loss_fast[k], loss_ref[k], rtol=1e-4, atol=1e-5)
    sum(loss_ref.values()).backward()
    sum(loss_fast.values()).backward()
    checked = 0
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert (p_ref.grad is None) == (p_fast.grad is None), name
        if p_ref.grad is not None:
            scale = float(p_ref.grad.abs().max())
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=0, atol=1e-4 * max(scale, 1e-3), msg=name)
            checked += 1
    assert checked > 20


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
