"""Iteration-based training loop: gradient accumulation, mixed precision, gradient clipping, non-finite guard.

One iteration (``run_step``) takes ``iter_size`` batches from the loader, averages their losses (so ``iter_size``
batches of ``B`` images train like one batch of ``iter_size * B``), and makes one optimizer and one scheduler step.
Logging, checkpointing and TensorBoard are hooks (:mod:`maskrcnn.engine.hooks`).

Reproducibility: the loop draws no random numbers itself; with the loader resumed at the right position
(``start_iter * iter_size`` batches) and the RNG states restored, iterations ``K..2K-1`` after a resume repeat those of
an uninterrupted run exactly on the CPU.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils import distributed as dist_utils
from .amp import autocast_context, check_amp

__all__ = ["Trainer", "NonFiniteLossError", "make_grad_scaler", "autocast_context", "move_to_device"]

logger = logging.getLogger("maskrcnn.trainer")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message gives the iteration, every loss value and the batch's image ids."""

    def __init__(self, message: str, iteration: int, losses: Dict[str, float], image_ids: List[Any]):
        super().__init__(message)
        self.iteration = iteration
        self.losses = losses
        self.image_ids = image_ids


def make_grad_scaler(amp: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A ``GradScaler`` for fp16 training on CUDA, else None (bf16 and fp32 need no loss scaling)."""
    device = torch.device(device)
    check_amp(amp, device)
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None


def move_to_device(images: Sequence[Tensor], targets: Optional[Sequence[Dict[str, Any]]], device: torch.device):
    """Images and the tensors of each target dict on ``device`` (other values untouched)."""
    non_blocking = torch.device(device).type == "cuda"
    images = [im.to(device, non_blocking=non_blocking) for im in images]
    if targets is None:
        return images, None
    moved = [{k: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v) for k, v in t.items()}
             for t in targets]
    return images, moved


def _image_id(target: Dict[str, Any]) -> Any:
    v = target.get("image_id")
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class Trainer:
    """Runs iterations ``start_iter .. max_iter - 1``.

    Args:
        model: returns a dict of scalar losses from ``model(images, targets)`` in train mode (possibly DDP-wrapped).
        optimizer, scheduler: the scheduler is stepped once per iteration.
        data_loader: endless iterator of ``(images, targets)`` batches, already positioned at ``start_iter``.
        max_iter: iterations of the whole run.
        start_iter: first iteration to run (the checkpoint's ``iteration`` when resuming).
        iter_size: batches per iteration (gradient accumulation; losses are averaged over them).
        amp: '' (fp32), 'fp16' (CUDA, with ``scaler``) or 'bf16' (CPU or CUDA).
        device: where the model lives; batches are moved there.
        clip_grad_norm: clip the total gradient norm to this value (0 disables).
        skip_nonfinite: on a NaN/inf loss, skip the step (no update; counted in ``skipped_steps``) instead of
            stopping with :class:`NonFiniteLossError`.
        max_consecutive_skips: with ``skip_nonfinite``, stop anyway after this many non-finite steps in a row.
        scaler: the ``GradScaler`` for fp16 (:func:`make_grad_scaler`).
        hooks: :class:`~maskrcnn.engine.hooks.HookBase` instances, called in order.

    Attributes for hooks (set by each step): ``iter``, ``losses`` (floats averaged over the accumulated batches),
    ``total_loss``, ``lr`` (the schedule's lr of this step, before the per-group factors), ``step_time``,
    ``data_time``, ``grad_norm`` (total gradient norm before clipping; None on a skipped step), ``image_ids``,
    ``skipped_steps``, ``step_skipped``, ``scaler_skipped_steps`` (fp16: updates the GradScaler skipped for inf/NaN
    gradients, as it lowered its scale); ``ema``: the :class:`~maskrcnn.engine.ema.ModelEMA` (set by ``EMAHook``;
    None without EMA).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data_loader: Iterator,
                 max_iter: int, start_iter: int = 0, iter_size: int = 1, amp: str = "",
                 device: Any = "cpu", clip_grad_norm: float = 0.0, skip_nonfinite: bool = False,
                 max_consecutive_skips: int = 20, scaler: Optional[torch.amp.GradScaler] = None,
                 hooks: Optional[Iterable[Any]] = None):
        if int(max_iter) < 1:
            raise ValueError(f"Trainer: max_iter must be >= 1, got {max_iter}")
        if not 0 <= int(start_iter) <= int(max_iter):
            raise ValueError(f"Trainer: start_iter must be in [0, max_iter={max_iter}], got {start_iter}")
        if int(iter_size) < 1:
            raise ValueError(f"Trainer: iter_size must be >= 1, got {iter_size}")
        if float(clip_grad_norm) < 0:
            raise ValueError(f"Trainer: clip_grad_norm must be >= 0, got {clip_grad_norm}")
        self.device = torch.device(device)
        check_amp(amp, self.device)
        if amp == "fp16" and scaler is None:
            raise ValueError("Trainer: amp='fp16' needs a GradScaler (make_grad_scaler('fp16', device))")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data_loader = data_loader
        self.max_iter = int(max_iter)
        self.start_iter = int(start_iter)
        self.iter_size = int(iter_size)
        self.amp = amp
        self.clip_grad_norm = float(clip_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.scaler = scaler
        self.ema = None  # set by maskrcnn.engine.ema.EMAHook when it is registered
        self.hooks: List[Any] = []
        self.register_hooks(hooks or [])

        self.iter = self.start_iter
        self.losses: Dict[str, float] = {}
        self.total_loss = float("nan")
        self.lr = float("nan")
        self.step_time = 0.0
        self.data_time = 0.0
        self.grad_norm: Optional[float] = None
        self.image_ids: List[Any] = []
        self.skipped_steps = 0
        self.scaler_skipped_steps = 0
        self.step_skipped = False
        self._consecutive_skips = 0
        self.completed = False

    def register_hooks(self, hooks: Iterable[Any]) -> None:
        for h in hooks:
            if h is None:
                continue
            h.trainer = self
            self.hooks.append(h)

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def train(self) -> None:
        """Run the remaining iterations, calling the hooks; ``after_train`` only runs when all iterations ran."""
        self.model.train()
        try:
            self._call("before_train")
            # max_iter is read at every iteration: a hook may move the end of the run (engine/budget.py).
            self.iter = self.start_iter
            while self.iter < self.max_iter:
                self._call("before_step")
                self.run_step()
                self._call("after_step")
                self.iter += 1
            self.iter = self.max_iter
            self.completed = True
            self._call("after_train")
        finally:
            self._call("close")

    # --- one iteration ------------------------------------------------------------------------------------------
    def _current_lr(self) -> float:
        g = self.optimizer.param_groups[0]
        return float(g["lr"]) / float(g.get("lr_factor", 1.0))

    def run_step(self) -> None:
        start = time.perf_counter()
        self.lr = self._current_lr()
        self.optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}
        self.image_ids, self.data_time, self.grad_norm, self.step_skipped = [], 0.0, None, False
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        for micro in range(self.iter_size):
            t0 = time.perf_counter()
            images, targets = next(self.data_loader)
            self.data_time += time.perf_counter() - t0
            ids = [_image_id(t) for t in targets]
            self.image_ids.extend(ids)
            images, targets = move_to_device(images, targets, self.device)
            last = micro == self.iter_size - 1
            # Only the last micro-batch all-reduces the accumulated gradients.
            sync = self.model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                with autocast_context(self.amp, self.device):
                    loss_dict = self.model(images, targets)
                losses = {k: v.float() for k, v in loss_dict.items()}
                total = sum(losses.values())
                values = {k: float(v.detach().item()) for k, v in losses.items()}
                finite = bool(torch.isfinite(total).item())
                # Every rank takes the same branch, otherwise the gradient all-reduce would hang.
                if not dist_utils.all_true(finite):
                    self._non_finite(values, float(total.detach().item()), finite)
                    break
                loss = total / self.iter_size
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / self.iter_size
        if not self.step_skipped:
            self._consecutive_skips = 0
            self.losses = sums
            self.total_loss = sum(sums.values())
            if self._optimizer_step():
                self.scheduler.step()
            else:
                with warnings.catch_warnings():
                    # fp16: the GradScaler skipped the update (inf/NaN gradients); the schedule still advances.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    self.scheduler.step()
        else:
            with warnings.catch_warnings():
                # The schedule advances with the iteration even when its update was skipped.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.scheduler.step()
        self.step_time = time.perf_counter() - start

    def _optimizer_step(self) -> bool:
        """Unscale (fp16), clip, step; returns False when the GradScaler skipped the update because of inf/NaN
        gradients (it then lowers its scale, which is how the skip is seen from outside)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_grad_norm > 0:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
        elif params:
            # Read-only (metrics.jsonl's grad_norm): the same total 2-norm clip_grad_norm_ returns.
            self.grad_norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])))
        if self.scaler is None:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stepped = not self.scaler.is_enabled() or self.scaler.get_scale() >= scale
        if not stepped:
            self.scaler_skipped_steps += 1
        return stepped

    def _non_finite(self, values: Dict[str, float], total: float, finite_here: bool) -> None:
        where = "" if not finite_here else " (on another process; this one's losses are finite)"
        loss_text = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        rank = dist_utils.get_rank()
        who = f" on rank {rank}" if dist_utils.get_world_size() > 1 else ""
        msg = (f"non-finite loss at iteration {self.iter}{who}{where}: {loss_text} (total {total:.6g}); "
               f"image ids of the batch: {self.image_ids}")
        self.optimizer.zero_grad(set_to_none=True)
        if not self.skip_nonfinite:
            raise NonFiniteLossError(
                msg + ". Training stopped without updating the weights; the last checkpoint written is kept. "
                "Try a lower SOLVER.BASE_LR, SOLVER.CLIP_GRAD_NORM > 0, or skip such steps (--skip_nonfinite).",
                self.iter, values, list(self.image_ids))
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self.step_skipped = True
        self.losses = values
        self.total_loss = total
        logger.warning("%s; step skipped (%d skipped so far)", msg, self.skipped_steps)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self._consecutive_skips} consecutive iterations had non-finite losses (last: {msg}); the training "
                f"has diverged. Lower SOLVER.BASE_LR or set SOLVER.CLIP_GRAD_NORM.", self.iter, values,
                list(self.image_ids))
