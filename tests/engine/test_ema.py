"""EMA of the weights (maskrcnn/engine/ema.py): the update rule, apply_to, checkpoints and exact resume, the hook."""
import io
import os
import sys

import pytest
import torch
from torch import nn

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.ema import EMAHook, ModelEMA
from maskrcnn.engine.hooks import HookBase, PeriodicCheckpointer
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.engine.trainer import Trainer
from maskrcnn.utils.checkpoint import Checkpointer, load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_update_follows_the_ramped_decay_and_copies_counters():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * model.state_dict()[k]
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k], v, rtol=1e-6, atol=1e-6)
    assert ema.updates == 30 and int(ema.shadow["1.num_batches_tracked"]) == 30


def test_apply_to_lends_the_ema_weights_and_restores_the_trained_ones_even_on_error():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = model.weight.detach().clone()
    with ema.apply_to(model) as m:
        assert m is model and not torch.equal(model.weight, trained)
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, trained)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.apply_to(model):
            raise RuntimeError("boom")
    assert torch.equal(model.weight, trained)


def test_state_dict_round_trips_weights_only_and_checks_names(caplog):
    model = _toy()
    model(torch.rand(1, 3, 6, 6))
    ema = ModelEMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = ModelEMA(model, decay=0.999)
    with caplog.at_level("WARNING"):
        other.load_state_dict(state)
    assert "differs from SOLVER.EMA_DECAY" in caplog.text and other.decay == 0.999
    assert other.updates == 3 and all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(ValueError, match="does not fit the model"):
        ModelEMA(nn.Linear(2, 2), 0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, 1.0)


def _dataset():
    return SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)


def _setup(start_iter=0):
    torch.manual_seed(0)
    model = ToyDetector()
    opt = build_optimizer(model, base_lr=0.1)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 3), gamma=0.5))
    loader = build_train_loader(_dataset(), ims_per_batch=2, aspect_grouping=False, seed=0, start_iter=start_iter)
    return model, opt, sched, loader, ModelEMA(model, 0.8)


class _Seen(HookBase):
    def before_train(self):
        self.ema = self.trainer.ema


def test_hook_makes_the_final_model_the_ema_and_resume_is_exact(tmp_path):
    # Uninterrupted: 6 iterations, EMA after every step, final weights = EMA weights.
    model, opt, sched, loader, ema = _setup()
    ck = Checkpointer(model, str(tmp_path / "full"), opt, sched, ema=ema)
    seen = _Seen()
    Trainer(model, opt, sched, loader, max_iter=6, hooks=[seen, EMAHook(ema), PeriodicCheckpointer(ck, 100)]).train()
    assert seen.ema is ema and ema.updates == 6
    assert all(torch.equal(v, ema.shadow[k]) for k, v in model.state_dict().items())
    final = load_checkpoint(str(tmp_path / "full" / "model_final.pth"))
    assert all(torch.equal(final["model"][k], ema.shadow[k].cpu()) for k in ema.shadow)
    full_ema = {k: v.clone() for k, v in ema.shadow.items()}

    # 3 iterations, checkpoint, a fresh process-like start resumed at 3: the same EMA and weights, bitwise.
    model, opt, sched, loader, ema = _setup()
    ck = Checkpointer(model, str(tmp_path / "split"), opt, sched, ema=ema)
    t = Trainer(model, opt, sched, loader, max_iter=6, hooks=[EMAHook(ema), PeriodicCheckpointer(ck, 3)])
    t.model.train()
    for t.iter in range(3):  # run iterations 0..2 and let the hooks save model_0000003 as they would
        t.run_step()
        for h in t.hooks:
            h.after_step()
    torch.manual_seed(123)
    model2, opt2, sched2, _, ema2 = _setup()
    state = Checkpointer(model2, str(tmp_path / "split"), opt2, sched2, ema=ema2).resume()
    assert int(state["iteration"]) == 3 and ema2.updates == 3
    loader2 = build_train_loader(_dataset(), ims_per_batch=2, aspect_grouping=False, seed=0, start_iter=3)
    Checkpointer.restore_rng(state)
    Trainer(model2, opt2, sched2, loader2, max_iter=6, start_iter=3, hooks=[EMAHook(ema2)]).train()
    for k, v in full_ema.items():
        assert torch.equal(ema2.shadow[k], v), k


def test_resuming_a_checkpoint_without_ema_starts_the_average_there(tmp_path, caplog):
    model, opt, sched, _, _ = _setup()
    Checkpointer(model, str(tmp_path), opt, sched).save("model_0000002", iteration=2)
    model2, opt2, sched2, _, ema2 = _setup()
    with torch.no_grad():
        model2.body.weight.add_(5.0)
    with caplog.at_level("WARNING"):
        Checkpointer(model2, str(tmp_path), opt2, sched2, ema=ema2).resume()
    assert "holds no EMA state" in caplog.text and ema2.updates == 0
    assert torch.equal(ema2.shadow["body.weight"], model.body.weight)
