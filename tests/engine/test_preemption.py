"""maskrcnn.engine.preemption on its own: a real signal sent to this process stops a toy training at the next
iteration boundary with a checkpoint, and resuming from it continues bit for bit."""
import os
import signal
import sys

import pytest
import torch

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.hooks import HookBase
from maskrcnn.engine.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler, PreemptionHook
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.engine.trainer import Trainer
from maskrcnn.utils.checkpoint import Checkpointer, load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402


class _SignalAt(HookBase):
    """Sends ``sig`` to this process in the middle of iteration ``at`` (after its forward, before its end)."""

    def __init__(self, at: int, sig: int):
        self.at, self.sig = at, sig

    def before_step(self):
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.sig)


def _run(out_dir, max_iter, signal_at=None, sig=signal.SIGUSR1, resume=False):
    torch.manual_seed(0)
    model = ToyDetector(width=4)
    optimizer = build_optimizer(model, base_lr=0.05)
    scheduler = WarmupMultiStepLR(optimizer, LRSchedule(0.05, steps=(0, 4), warmup_iters=2))
    ck = Checkpointer(model, str(out_dir), optimizer, scheduler)
    start = int(ck.resume()["iteration"]) if resume else 0
    dataset = SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)
    loader = build_train_loader(dataset, ims_per_batch=2, aspect_grouping=False, seed=3, start_iter=start,
                                validate=False)
    handler = PreemptionHandler().install()
    hooks = [PreemptionHook(handler, ck)] + ([_SignalAt(signal_at, sig)] if signal_at is not None else [])
    trainer = Trainer(model, optimizer, scheduler, loader, max_iter=max_iter, start_iter=start, hooks=hooks)
    try:
        trainer.train()
    finally:
        handler.uninstall()
        loader.close()
    return model


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_writes_a_checkpoint_at_the_next_boundary_and_resume_is_bitwise(tmp_path, sig):
    before = signal.getsignal(sig)
    full = _run(tmp_path / "full", max_iter=6)
    with pytest.raises(Preempted) as info:
        _run(tmp_path / "cut", max_iter=6, signal_at=2, sig=sig)
    # The signal came during iteration 2 (0-based): that iteration finished, 3 are done.
    assert info.value.iteration == 3 and info.value.signal_name == signal.Signals(sig).name
    assert info.value.checkpoint == str(tmp_path / "cut" / "model_0000003.pth")
    assert "continue with --resume" in str(info.value)
    assert load_checkpoint(info.value.checkpoint)["iteration"] == 3
    assert signal.getsignal(sig) == before  # the previous handler is back
    resumed = _run(tmp_path / "cut", max_iter=6, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_signal_during_the_last_iteration_finishes_normally(tmp_path):
    _run(tmp_path, max_iter=3, signal_at=2)
    assert not (tmp_path / "model_0000003.pth").exists()


def test_handler_restores_previous_handlers_and_rejects_unknown_signals():
    before = signal.getsignal(signal.SIGUSR1)
    h = PreemptionHandler(["SIGUSR1"]).install()
    assert signal.getsignal(signal.SIGUSR1) == h._handle
    assert not h.requested
    os.kill(os.getpid(), signal.SIGUSR1)
    assert h.requested and h.signal_name == "SIGUSR1"
    h.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        PreemptionHandler(["SIGNOPE"])
    assert EXIT_PREEMPTED == 75
