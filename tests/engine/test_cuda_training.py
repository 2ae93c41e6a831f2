"""Training on CUDA: the engine's steps under ``TRAIN.AMP fp16`` (with its GradScaler) and ``bf16`` against fp32,
DDP over NCCL with one process, and ``train_net`` on the real model with each precision.

Skipped on machines without a visible CUDA device; tests/engine/test_grad_scaler.py runs the GradScaler logic on the
CPU."""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from maskrcnn.data.build import build_train_loader
from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset
from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.engine.trainer import Trainer, make_grad_scaler
from maskrcnn.utils.checkpoint import load_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from engine_toys import ToyDetector  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA test: torch.cuda.is_available() is False (no GPU visible)")

CUDA = torch.device("cuda", 0)
SMOKE = "quick_schedules/e2e_mask_rcnn_R-18-FPN_smoke"


def _train(amp="", wrap=None, steps=6, scaler=None):
    torch.manual_seed(0)
    model = ToyDetector(width=8).to(CUDA)
    opt = build_optimizer(model, base_lr=0.05)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.05, steps=(0, 4), warmup_iters=1))
    dataset = SyntheticShapesDataset("train", num_images=16, image_size=(32, 32), max_object_size=16)
    loader = build_train_loader(dataset, ims_per_batch=2, aspect_grouping=False, seed=0)
    trainer = Trainer(wrap(model) if wrap else model, opt, sched, loader, max_iter=steps, amp=amp, device=CUDA,
                      scaler=scaler if scaler is not None else make_grad_scaler(amp, CUDA))
    trainer.train()
    return model, trainer


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((a.state_dict()[k] - v).abs().max() / (v.abs().max() + 1e-6)) for k, v in b.state_dict().items())


def test_fp16_with_grad_scaler_and_bf16_steps_follow_fp32():
    ref, _ = _train("")
    # a scale small enough that no fp16 gradient overflows on this toy: every update is taken, as in fp32
    runs = (("fp16", 1e-2, torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)), ("bf16", 5e-2, None))
    for amp, tol, scaler in runs:
        model, trainer = _train(amp, scaler=scaler)
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        assert _max_rel_diff(model, ref) < tol, amp
        if amp == "fp16":
            assert trainer.scaler_skipped_steps == 0 and trainer.scaler.get_scale() == 2.0 ** 8
        else:
            assert trainer.scaler is None


def test_fp16_default_scaler_backs_off_on_overflow_and_trains():
    """``make_grad_scaler('fp16')`` starts at 2**16, where fp16 gradients of this toy can overflow (2**16 itself is
    above fp16's maximum): such updates are skipped, each halving the scale, and training goes on finite."""
    model, trainer = _train("fp16", steps=12)
    skipped = trainer.scaler_skipped_steps
    assert trainer.scaler.get_scale() == 2.0 ** 16 * 0.5 ** skipped
    assert skipped < 12
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.losses.values())


def test_ddp_over_nccl_with_one_process_equals_the_plain_model():
    ref, _ = _train("")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            model, trainer = _train("", wrap=lambda m: nn.parallel.DistributedDataParallel(m, device_ids=[0]))
            assert isinstance(trainer.model, nn.parallel.DistributedDataParallel)
            assert dist.get_backend() == "nccl"
        finally:
            dist.destroy_process_group()
    for k, v in ref.state_dict().items():  # the all-reduce of one process is the identity
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("amp", ["", "fp16", "bf16"])
def test_train_net_on_cuda(tmp_path, amp):
    from maskrcnn.cli import train_net

    out = tmp_path / (amp or "fp32")
    rc = train_net.main(["--cfg", SMOKE, "--dataset", "synthetic:train", "--nw", "0", "--output_dir", str(out),
                         "--set", "MODEL.DEVICE", "cuda", "TRAIN.AMP", amp, "SOLVER.MAX_ITER", "4"])
    assert rc == 0
    ckpt = load_checkpoint(str(out / "model_final.pth"))
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ("scaler" in ckpt) == (amp == "fp16")
    if amp == "fp16":
        assert 1.0 <= ckpt["scaler"]["scale"] <= 2.0 ** 16
    log = (out / "log.txt").read_text()
    assert "iter" in log and "nan" not in log.lower()
