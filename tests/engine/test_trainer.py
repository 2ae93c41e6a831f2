import logging
import os
import sys

import pytest
import torch

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.hooks import LogHook, PeriodicCheckpointer, TensorboardUnavailable, TensorboardWriter
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.engine.trainer import NonFiniteLossError, Trainer, autocast_context, make_grad_scaler
from maskrcnn.utils.checkpoint import Checkpointer, load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402


def _dataset():
    return SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)


def _setup(ims_per_batch=2, iter_size=1, start_iter=0, model=None, lr=0.1, seed=0, **trainer_kw):
    torch.manual_seed(0)
    model = model if model is not None else ToyDetector()
    opt = build_optimizer(model, base_lr=lr)
    sched = WarmupMultiStepLR(opt, LRSchedule(lr, steps=(0, 3), gamma=0.5, warmup_iters=2, warmup_factor=0.5))
    loader = build_train_loader(_dataset(), ims_per_batch=ims_per_batch, aspect_grouping=False, seed=seed,
                                start_iter=start_iter * iter_size)
    return model, opt, sched, loader


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_a_larger_batch():
    runs = []
    for bs, iter_size in ((2, 1), (1, 2)):
        model, opt, sched, loader = _setup(ims_per_batch=bs, iter_size=iter_size)
        t = Trainer(model, opt, sched, loader, max_iter=4, iter_size=iter_size)
        t.train()
        runs.append((_params(model), t.losses))
    (pa, la), (pb, lb) = runs
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-5)


def test_trainer_follows_schedule_and_counts_iterations():
    model, opt, sched, loader = _setup()
    seen = []

    class Spy(LogHook):
        def after_step(self):
            seen.append((self.trainer.iter, self.trainer.lr))

    t = Trainer(model, opt, sched, loader, max_iter=5, hooks=[Spy(100)])
    before = _params(model)
    t.train()
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert [lr for _, lr in seen] == pytest.approx([0.05, 0.075, 0.1, 0.05, 0.05])
    assert t.completed and sched.last_epoch == 5
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_from_the_loop_state_is_exact(tmp_path):
    """K iterations + checkpoint + a fresh trainer resumed at K == 2K iterations (bitwise)."""
    model, opt, sched, loader = _setup()
    Trainer(model, opt, sched, loader, max_iter=6).train()
    full = _params(model)

    model, opt, sched, loader = _setup()
    ck = Checkpointer(model, str(tmp_path), opt, sched)
    Trainer(model, opt, sched, loader, max_iter=3, hooks=[PeriodicCheckpointer(ck, period=100)]).train()
    torch.manual_seed(123)  # anything drawn between runs must not matter
    model2, opt2, sched2, _ = _setup()
    state = Checkpointer(model2, str(tmp_path), opt2, sched2).resume()
    loader2 = build_train_loader(_dataset(), ims_per_batch=2, aspect_grouping=False, seed=0,
                                 start_iter=int(state["iteration"]))
    Checkpointer.restore_rng(state)
    Trainer(model2, opt2, sched2, loader2, max_iter=6, start_iter=int(state["iteration"])).train()
    for k, v in full.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_non_finite_loss_stops_with_iteration_losses_and_image_ids(tmp_path):
    model, opt, sched, loader = _setup(model=ToyDetector(nan_at=[4]))
    ck = Checkpointer(model, str(tmp_path), opt, sched)
    saver = PeriodicCheckpointer(ck, period=2)
    t = Trainer(model, opt, sched, loader, max_iter=10, hooks=[saver])
    with pytest.raises(NonFiniteLossError) as info:
        t.train()
    msg = str(info.value)
    assert "iteration 4" in msg and "loss_b=nan" in msg and "loss_a=" in msg
    assert "image ids of the batch: [" in msg and info.value.image_ids == t.image_ids and len(t.image_ids) == 2
    assert info.value.iteration == 4
    # The weights are those after 4 iterations (no update from the bad batch); the last checkpoint is kept.
    saved = load_checkpoint(str(tmp_path / "model_0000004.pth"))
    assert saved["iteration"] == 4
    assert not (tmp_path / "model_final.pth").exists()
    for k, v in model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k


def test_skip_non_finite_counts_and_continues():
    model, opt, sched, loader = _setup(model=ToyDetector(nan_at=[1, 2]))
    t = Trainer(model, opt, sched, loader, max_iter=5, skip_nonfinite=True)
    t.train()
    assert t.completed and t.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sched.last_epoch == 5  # skipped iterations still advance the schedule and the data


def test_too_many_consecutive_non_finite_steps_stop_anyway():
    model, opt, sched, loader = _setup(model=ToyDetector(nan_at=list(range(100))))
    t = Trainer(model, opt, sched, loader, max_iter=50, skip_nonfinite=True, max_consecutive_skips=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive iterations"):
        t.train()


def test_gradient_clipping_bounds_the_update():
    model, opt, sched, loader = _setup(lr=1.0)
    before = _params(model)
    opt.param_groups[0]["momentum"] = 0.0
    for g in opt.param_groups:
        g["momentum"] = 0.0
        g["weight_decay"] = 0.0
    t = Trainer(model, opt, sched, loader, max_iter=1, clip_grad_norm=1e-3)
    t.train()
    assert t.grad_norm is not None and t.grad_norm > 1e-3
    # One SGD step with lr <= 2 * 0.5 (warm-up, bias factor) and clipped gradients moves each tensor by <= 1e-3.
    total = sum(((model.state_dict()[k] - before[k]).float() ** 2).sum() for k in before) ** 0.5
    assert total <= 1e-3 * 1.0 * 2 + 1e-7


def test_bf16_autocast_on_cpu_trains():
    model, opt, sched, loader = _setup()
    t = Trainer(model, opt, sched, loader, max_iter=2, amp="bf16")
    t.train()
    assert all(torch.isfinite(torch.tensor(v)) for v in t.losses.values())
    with autocast_context("bf16", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


def test_amp_argument_checks():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        make_grad_scaler("fp16", torch.device("cpu"))
    assert make_grad_scaler("bf16", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="amp must be"):
        autocast_context("fp8", torch.device("cpu"))
    model, opt, sched, loader = _setup()
    with pytest.raises(ValueError, match="start_iter"):
        Trainer(model, opt, sched, loader, max_iter=3, start_iter=4)


# --- hooks ------------------------------------------------------------------------------------------------------
def test_log_hook_line_has_losses_lr_time_eta_and_memory():
    model, opt, sched, loader = _setup()
    logger = logging.getLogger("test.trainer.log")
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger.addHandler(H())
    logger.setLevel(logging.INFO)
    hook = LogHook(period=2, logger=logger, show_bar=True)
    Trainer(model, opt, sched, loader, max_iter=5, hooks=[hook]).train()
    assert len(records) == 3  # iterations 2, 4 and the last one (5)
    line = records[0]
    for part in ("iter 2/5", "loss ", "loss_a ", "loss_b ", "lr 0.075", " s/it (data ", "eta 0:00:", "mem ", "(rss)",
                 "[########"):
        assert part in line, (part, line)
    assert records[-1].startswith("[") and "iter 5/5" in records[-1]


def test_periodic_checkpointer_names_and_final(tmp_path):
    model, opt, sched, loader = _setup()
    ck = Checkpointer(model, str(tmp_path), opt, sched)
    saver = PeriodicCheckpointer(ck, period=2, cfg_yaml="X: 1\n")
    Trainer(model, opt, sched, loader, max_iter=5, hooks=[saver]).train()
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))
    assert names == ["model_0000002.pth", "model_0000004.pth", "model_final.pth"]
    final = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert final["iteration"] == 5 and final["cfg"] == "X: 1\n" and "scheduler" in final and "optimizer" in final
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(TensorboardUnavailable, match="pip install tensorboard"):
        TensorboardWriter("/nonexistent/tb")
