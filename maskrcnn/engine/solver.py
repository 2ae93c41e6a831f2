"""Optimizers (SGD, AdamW) with Detectron's parameter groups, the learning-rate schedules, and the linear scaling
rule.

Schedule (Detectron's ``lr_policy``), for iteration ``it`` counted from 0::

    steps_with_decay: lr = BASE_LR * GAMMA ** (number of STEPS s with 0 < s <= it)      (multi-step; a leading 0
                                                                                          is allowed)
    cosine_decay:     lr = BASE_LR_END + (BASE_LR - BASE_LR_END) * (1 + cos(pi * it / MAX_ITER)) / 2
                      (Detectron's cosine_decay with BASE_LR_END = 0; detectron2's WarmupCosineLR)
    constant:         lr = BASE_LR
    warm-up (it < WARM_UP_ITERS): lr *= WARM_UP_FACTOR (constant) or
                                  WARM_UP_FACTOR * (1 - it / WARM_UP_ITERS) + it / WARM_UP_ITERS (linear)

The lr used for the optimizer step of iteration ``it`` is ``lr_at(it)``; parameter groups multiply it by their
``lr_factor`` (2 for biases with ``SOLVER.BIAS_DOUBLE_LR``).

Linear scaling rule (Goyal et al. 2017, as Detectron states it: "the learning rate is scaled linearly with the total
batch size", e.g. BASE_LR 0.02 for 16 images per step): :func:`scale_schedule` applies it when the run's total
batch differs from the config's, and :func:`describe_solver` states it in the training log.
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LRSchedule", "lr_at", "WarmupMultiStepLR", "build_optimizer", "build_optimizer_from_cfg",
           "build_lr_scheduler", "scale_schedule", "describe_solver", "NORM_TYPES", "LR_POLICIES", "OPTIMIZERS"]

logger = logging.getLogger("maskrcnn.solver")

#: Normalisation layers whose affine parameters get ``weight_decay_norm`` (Detectron: ``WEIGHT_DECAY_GN``).
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
              nn.modules.instancenorm._InstanceNorm)
#: Values of ``SOLVER.LR_POLICY``.
LR_POLICIES = ("steps_with_decay", "cosine_decay", "constant")
#: Values of ``SOLVER.OPTIMIZER``.
OPTIMIZERS = ("SGD", "AdamW")


def lr_at(iteration: int, base_lr: float, policy: str = "steps_with_decay", steps: Sequence[int] = (),
          gamma: float = 0.1, warmup_iters: int = 0, warmup_factor: float = 1.0 / 3.0,
          warmup_method: str = "linear", max_iter: int = 0, base_lr_end: float = 0.0) -> float:
    """The learning rate of iteration ``iteration`` (0-based), see the module docstring. ``max_iter`` (> 0) and
    ``base_lr_end`` are read by ``cosine_decay`` only (iterations past ``max_iter`` keep ``base_lr_end``)."""
    it = int(iteration)
    if it < 0:
        raise ValueError(f"lr_at: iteration must be >= 0, got {iteration}")
    if policy == "steps_with_decay":
        decays = bisect.bisect_right([int(s) for s in steps if int(s) > 0], it)
        lr = float(base_lr) * float(gamma) ** decays
    elif policy == "cosine_decay":
        if int(max_iter) < 1:
            raise ValueError(f"lr_at: policy 'cosine_decay' needs max_iter >= 1, got {max_iter}")
        frac = min(it, int(max_iter)) / float(max_iter)
        lr = float(base_lr_end) + (float(base_lr) - float(base_lr_end)) * 0.5 * (1.0 + math.cos(math.pi * frac))
    elif policy == "constant":
        lr = float(base_lr)
    else:
        raise ValueError(f"lr_at: policy must be one of {', '.join(map(repr, LR_POLICIES))}, got {policy!r}")
    if it < int(warmup_iters):
        if warmup_method == "constant":
            lr *= float(warmup_factor)
        elif warmup_method == "linear":
            alpha = it / float(warmup_iters)
            lr *= float(warmup_factor) * (1.0 - alpha) + alpha
        else:
            raise ValueError(f"lr_at: warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
    return lr


@dataclass(frozen=True)
class LRSchedule:
    """The schedule's settings; ``schedule(it)`` is :func:`lr_at` with them."""

    base_lr: float
    policy: str = "steps_with_decay"
    steps: tuple = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 1.0 / 3.0
    warmup_method: str = "linear"
    max_iter: int = 0
    base_lr_end: float = 0.0

    def __post_init__(self):
        if not self.base_lr > 0:
            raise ValueError(f"LRSchedule: base_lr must be > 0, got {self.base_lr}")
        if not 0 <= self.base_lr_end <= self.base_lr:
            raise ValueError(f"LRSchedule: base_lr_end must be in [0, base_lr={self.base_lr}], got {self.base_lr_end}")
        steps = [int(s) for s in self.steps]
        if any(s < 0 for s in steps) or steps != sorted(steps):
            raise ValueError(f"LRSchedule: steps must be non-negative and increasing, got {list(self.steps)}")
        lr_at(0, self.base_lr, self.policy, steps, self.gamma, self.warmup_iters, self.warmup_factor,
              self.warmup_method, self.max_iter, self.base_lr_end)  # validates policy / warm-up method / max_iter

    def __call__(self, iteration: int) -> float:
        return lr_at(iteration, self.base_lr, self.policy, self.steps, self.gamma, self.warmup_iters,
                     self.warmup_factor, self.warmup_method, self.max_iter, self.base_lr_end)

    @classmethod
    def from_cfg(cls, cfg) -> "LRSchedule":
        s = cfg.SOLVER
        return cls(base_lr=float(s.BASE_LR), policy=s.LR_POLICY, steps=tuple(int(x) for x in s.STEPS),
                   gamma=float(s.GAMMA), warmup_iters=int(s.WARM_UP_ITERS), warmup_factor=float(s.WARM_UP_FACTOR),
                   warmup_method=s.WARM_UP_METHOD, max_iter=int(s.MAX_ITER), base_lr_end=float(s.BASE_LR_END))


class WarmupMultiStepLR(LRScheduler):
    """Sets each group's lr to ``schedule(last_epoch) * group["lr_factor"]``; ``last_epoch`` counts optimizer steps,
    so after ``k`` calls of ``step()`` the next optimizer step uses ``lr_at(k)``. Runs every policy of
    :data:`LR_POLICIES` (multi-step, cosine, constant) with its warm-up; the name is kept from the step-only days.

    Its ``state_dict`` holds plain numbers only (no callables), so it round-trips through
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, last_epoch: int = -1):
        self.base_lr = float(schedule.base_lr)
        self.policy = schedule.policy
        self.steps = [int(s) for s in schedule.steps]
        self.gamma = float(schedule.gamma)
        self.warmup_iters = int(schedule.warmup_iters)
        self.warmup_factor = float(schedule.warmup_factor)
        self.warmup_method = schedule.warmup_method
        self.max_iter = int(schedule.max_iter)
        self.base_lr_end = float(schedule.base_lr_end)
        for g in optimizer.param_groups:
            g.setdefault("lr_factor", 1.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int) -> float:
        return lr_at(iteration, self.base_lr, self.policy, self.steps, self.gamma, self.warmup_iters,
                     self.warmup_factor, self.warmup_method, self.max_iter, self.base_lr_end)

    def get_lr(self) -> List[float]:
        lr = self.lr_at(max(self.last_epoch, 0))
        return [lr * float(g.get("lr_factor", 1.0)) for g in self.optimizer.param_groups]

    _SETTINGS = ("base_lr", "policy", "steps", "gamma", "warmup_iters", "warmup_factor", "warmup_method", "max_iter",
                 "base_lr_end")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the position in the schedule (``last_epoch``); the schedule itself stays the one this scheduler
        was built with (the config of the resumed run), and every group's lr is set from it. A checkpoint written
        with other schedule settings is reported."""
        state = dict(state_dict)
        changed = {k: (state[k], getattr(self, k)) for k in self._SETTINGS
                   if k in state and state[k] != getattr(self, k)}
        if changed:
            logger.warning("the checkpoint's lr schedule differs from the config's; the config's is used: %s",
                           ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        for k in self._SETTINGS:
            state.pop(k, None)
        state.pop("base_lrs", None)
        super().load_state_dict(state)
        lrs = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = list(lrs)


def build_optimizer(model: nn.Module, base_lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                    bias_lr_factor: float = 2.0, bias_weight_decay: bool = False,
                    weight_decay_norm: float = 0.0, optimizer: str = "SGD",
                    betas: Sequence[float] = (0.9, 0.999), weight_decay_bias: Optional[float] = None
                    ) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW (with ``betas``; decoupled weight decay) over Detectron's three parameter
    groups (frozen parameters excluded):

    * ``"weights"``: lr factor 1, ``weight_decay``;
    * ``"biases"`` (biases of non-norm layers): lr factor ``bias_lr_factor``, ``weight_decay_bias`` when given,
      else ``weight_decay`` if ``bias_weight_decay`` else 0 (Detectron);
    * ``"norms"`` (weights and biases of GroupNorm/BatchNorm/LayerNorm): lr factor 1, ``weight_decay_norm``.

    Every group carries ``name`` and ``lr_factor`` (the scheduler multiplies the schedule's lr by it).
    """
    if not base_lr > 0:
        raise ValueError(f"build_optimizer: base_lr must be > 0, got {base_lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"build_optimizer: optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, "
                         f"got {optimizer!r}")
    bias_decay = (float(weight_decay) if bias_weight_decay else 0.0) if weight_decay_bias is None \
        else float(weight_decay_bias)
    if weight_decay < 0 or weight_decay_norm < 0 or bias_decay < 0:
        raise ValueError(f"build_optimizer: weight decays must be >= 0, got {weight_decay}, {weight_decay_norm}, "
                         f"{bias_decay}")
    weights, biases, norms = [], [], []
    seen = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if is_norm:
                norms.append(p)
            elif name == "bias":
                biases.append(p)
            else:
                weights.append(p)
    if not (weights or biases or norms):
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = [
        {"name": "weights", "params": weights, "lr_factor": 1.0, "weight_decay": float(weight_decay)},
        {"name": "biases", "params": biases, "lr_factor": float(bias_lr_factor), "weight_decay": bias_decay},
        {"name": "norms", "params": norms, "lr_factor": 1.0, "weight_decay": float(weight_decay_norm)},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = float(base_lr) * g["lr_factor"]
    if optimizer == "AdamW":
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"build_optimizer: AdamW betas must lie in [0, 1), got {list(betas)}")
        return torch.optim.AdamW(groups, lr=float(base_lr), betas=(b1, b2))
    return torch.optim.SGD(groups, lr=float(base_lr), momentum=float(momentum))


def build_optimizer_from_cfg(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """:func:`build_optimizer` with ``SOLVER.*`` settings: ``OPTIMIZER``, ``BASE_LR``, ``MOMENTUM`` (SGD),
    ``ADAM_BETAS`` (AdamW), ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` (< 0: ``WEIGHT_DECAY_GN``, Detectron's key),
    ``WEIGHT_DECAY_BIAS`` (< 0: Detectron's ``BIAS_WEIGHT_DECAY`` rule), ``BIAS_DOUBLE_LR``."""
    s = cfg.SOLVER
    norm_decay = float(s.WEIGHT_DECAY_NORM) if float(s.WEIGHT_DECAY_NORM) >= 0 else float(s.WEIGHT_DECAY_GN)
    bias_decay = float(s.WEIGHT_DECAY_BIAS) if float(s.WEIGHT_DECAY_BIAS) >= 0 else None
    return build_optimizer(model, base_lr=float(s.BASE_LR), momentum=float(s.MOMENTUM),
                           weight_decay=float(s.WEIGHT_DECAY), bias_lr_factor=2.0 if s.BIAS_DOUBLE_LR else 1.0,
                           bias_weight_decay=bool(s.BIAS_WEIGHT_DECAY), weight_decay_norm=norm_decay,
                           optimizer=str(s.OPTIMIZER), betas=tuple(s.ADAM_BETAS), weight_decay_bias=bias_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> WarmupMultiStepLR:
    """:class:`WarmupMultiStepLR` with ``SOLVER.*`` settings."""
    return WarmupMultiStepLR(optimizer, LRSchedule.from_cfg(cfg))


def scale_schedule(cfg, total_batch: int, config_batch: Optional[int] = None,
                   log: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """Detectron's linear scaling rule, applied to an unfrozen ``cfg`` in place.

    When ``total_batch`` (images per optimizer step: processes x ``TRAIN.IMS_PER_BATCH`` x gradient-accumulation
    steps) differs from ``config_batch`` (what the config was tuned for: ``NUM_GPUS x TRAIN.IMS_PER_BATCH`` as
    written in its file; by default read from ``cfg``), ``SOLVER.BASE_LR`` is multiplied by
    ``ratio = total_batch / config_batch`` and ``SOLVER.MAX_ITER``, ``SOLVER.STEPS`` and ``SOLVER.WARM_UP_ITERS``
    divided by it (rounded; at least 1 iteration), so that the same number of images is seen at the same lrs.
    Nothing changes when ``SOLVER.SCALE_WITH_BATCH`` is False.

    Returns ``{"ratio", "changed": bool, "message"}``; the message is also passed to ``log`` (default: the
    ``maskrcnn.solver`` logger).
    """
    if cfg.is_frozen():
        raise ValueError("scale_schedule: cfg is frozen; call it before assert_and_infer_cfg freezes the config")
    if config_batch is None:
        config_batch = int(cfg.NUM_GPUS) * int(cfg.TRAIN.IMS_PER_BATCH)
    total_batch, config_batch = int(total_batch), int(config_batch)
    if total_batch < 1 or config_batch < 1:
        raise ValueError(f"scale_schedule: batch sizes must be >= 1, got total_batch={total_batch}, "
                         f"config_batch={config_batch}")
    ratio = total_batch / config_batch
    log = log if log is not None else logger.info
    if total_batch == config_batch:
        msg = (f"linear scaling rule (Detectron: lr proportional to the total batch): the total batch "
               f"{total_batch} equals the config's ({config_batch}), BASE_LR {float(cfg.SOLVER.BASE_LR):g} and the "
               f"schedule are used as written")
        log(msg)
        return {"ratio": 1.0, "changed": False, "message": msg}
    if not cfg.SOLVER.SCALE_WITH_BATCH:
        msg = (f"total batch {total_batch} differs from the config's {config_batch} but SOLVER.SCALE_WITH_BATCH is "
               f"False: BASE_LR and the schedule are used as written")
        log(msg)
        return {"ratio": ratio, "changed": False, "message": msg}
    s = cfg.SOLVER
    old = (s.BASE_LR, s.MAX_ITER, list(s.STEPS), s.WARM_UP_ITERS)

    def scaled_iters(n: int) -> int:
        return int(math.floor(n / ratio + 0.5))

    s.BASE_LR = float(s.BASE_LR) * ratio
    s.BASE_LR_END = float(s.BASE_LR_END) * ratio
    s.MAX_ITER = max(1, scaled_iters(int(s.MAX_ITER)))
    s.STEPS = [scaled_iters(int(x)) for x in s.STEPS]
    s.WARM_UP_ITERS = scaled_iters(int(s.WARM_UP_ITERS))
    msg = (f"linear scaling rule (Detectron: lr proportional to the total batch): total batch {total_batch} vs the config's {config_batch} (ratio {ratio:g}): "
           f"BASE_LR {old[0]:g} -> {s.BASE_LR:g}, MAX_ITER {old[1]} -> {s.MAX_ITER}, STEPS {old[2]} -> "
           f"{list(s.STEPS)}, WARM_UP_ITERS {old[3]} -> {s.WARM_UP_ITERS}")
    log(msg)
    return {"ratio": ratio, "changed": True, "message": msg}


def describe_solver(cfg, optimizer: torch.optim.Optimizer, total_batch: int) -> str:
    """One log line stating the optimizer, its groups, the schedule and the batch the lr applies to."""
    s = cfg.SOLVER
    groups = ", ".join(f"{g.get('name', i)} ({len(g['params'])} tensors, lr x{g.get('lr_factor', 1.0):g}, "
                       f"wd {g['weight_decay']:g})" for i, g in enumerate(optimizer.param_groups))
    kind = type(optimizer).__name__
    extra = f"momentum {float(s.MOMENTUM):g}" if kind == "SGD" else f"betas {tuple(float(b) for b in s.ADAM_BETAS)}"
    if s.LR_POLICY == "steps_with_decay":
        sched = f"steps_with_decay at {list(s.STEPS)} x{float(s.GAMMA):g}"
    elif s.LR_POLICY == "cosine_decay":
        sched = f"cosine_decay to {float(s.BASE_LR_END):g} at iteration {int(s.MAX_ITER)}"
    else:
        sched = str(s.LR_POLICY)
    warm = (f", {s.WARM_UP_METHOD} warm-up over {int(s.WARM_UP_ITERS)} iterations from x{float(s.WARM_UP_FACTOR):g}"
            if int(s.WARM_UP_ITERS) > 0 else "")
    return (f"solver: {kind} ({extra}), BASE_LR {float(s.BASE_LR):g} for a total batch of {int(total_batch)} images "
            f"per step (linear scaling rule: lr proportional to the total batch), {sched}{warm}, "
            f"{int(s.MAX_ITER)} iterations; groups: {groups}")
