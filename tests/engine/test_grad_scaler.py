"""The fp16 path of the Trainer (GradScaler: scaled backward, unscale before clipping, skipped step on inf/NaN
gradients, scale back-off) exercised on the CPU with ``torch.amp.GradScaler("cpu")``: the scaler's logic is the
same on both devices, only autocast's fp16 needs CUDA (tests/engine/test_cuda_training.py runs it there)."""
import os
import sys
import warnings

import torch

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.hooks import HookBase
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.engine.trainer import Trainer
from maskrcnn.utils.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402


def _run(max_iter=4, scaler=None, clip=0.0, inf_grad_at=(), hooks=()):
    torch.manual_seed(0)
    model = ToyDetector()
    opt = build_optimizer(model, base_lr=0.1)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 3), gamma=0.5, warmup_iters=2, warmup_factor=0.5))
    dataset = SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)
    loader = build_train_loader(dataset, ims_per_batch=2, aspect_grouping=False, seed=0)
    calls = {"n": 0}

    def poison(grad):  # an overflowing gradient at the chosen iterations, as fp16 produces
        calls["n"] += 1
        return grad * float("inf") if calls["n"] - 1 in inf_grad_at else grad

    model.head_a.weight.register_hook(poison)
    trainer = Trainer(model, opt, sched, loader, max_iter=max_iter, scaler=scaler, clip_grad_norm=clip,
                      hooks=list(hooks))
    return model, trainer


class _Record(HookBase):
    def __init__(self):
        self.rows = []

    def after_step(self):
        t = self.trainer
        self.rows.append((t.iter, t.grad_norm, {k: v.detach().clone() for k, v in t.model.state_dict().items()},
                          t.scaler.get_scale() if t.scaler is not None else None))


def test_scaled_steps_equal_plain_fp32_steps_and_clip_sees_unscaled_gradients():
    rec_plain, rec_scaled = _Record(), _Record()
    _, plain = _run(clip=0.5, hooks=[rec_plain])
    plain.train()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    _, scaled = _run(clip=0.5, scaler=scaler, hooks=[rec_scaled])
    scaled.train()
    for (it_a, norm_a, w_a, _), (it_b, norm_b, w_b, scale) in zip(rec_plain.rows, rec_scaled.rows):
        assert it_a == it_b
        # a power-of-two scale is exact in float32: the norm is of the unscaled gradients, the weights match
        assert norm_b == norm_a and norm_a is not None
        for k in w_a:
            torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-6, atol=1e-7)
    assert [r[3] for r in rec_scaled.rows] == [4096.0, 8192.0, 8192.0, 16384.0]  # grows every 2 good steps


def test_inf_gradient_skips_the_update_and_halves_the_scale():
    rec = _Record()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=100)
    model, trainer = _run(scaler=scaler, inf_grad_at=(1,), hooks=[rec])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" is not raised
        trainer.train()
    (_, _, w0, s0), (_, _, w1, s1), (_, _, w2, s2), _ = rec.rows
    assert (s0, s1, s2) == (4096.0, 2048.0, 2048.0)
    for k in w0:  # iteration 1 changed nothing (every parameter, not only the poisoned one)
        assert torch.equal(w1[k], w0[k]), k
    assert any(not torch.equal(w2[k], w1[k]) for k in w1)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    # the loss was finite: the scaler, not the non-finite-loss guard, skipped
    assert trainer.skipped_steps == 0 and trainer.scaler_skipped_steps == 1


def test_disabled_scaler_is_plain_fp32():
    rec_plain, rec_off = _Record(), _Record()
    _, plain = _run(hooks=[rec_plain])
    plain.train()
    _, off = _run(scaler=torch.amp.GradScaler("cpu", enabled=False), hooks=[rec_off])
    off.train()
    assert off.scaler_skipped_steps == 0
    for (_, _, w_a, _), (_, _, w_b, scale) in zip(rec_plain.rows, rec_off.rows):
        assert scale == 1.0
        for k in w_a:
            assert torch.equal(w_a[k], w_b[k]), k


def test_checkpoint_carries_the_scaler_state(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=100)
    model, trainer = _run(scaler=scaler, inf_grad_at=(0,))
    trainer.train()
    Checkpointer(model, str(tmp_path), trainer.optimizer, trainer.scheduler, scaler).save("model_final", iteration=4)
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0)
    Checkpointer(ToyDetector(), str(tmp_path), scaler=fresh).resume(str(tmp_path / "model_final.pth"))
    assert fresh.get_scale() == 2048.0 == scaler.get_scale()
