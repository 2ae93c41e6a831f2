"""Exponential moving average (EMA) of a model's weights (``SOLVER.EMA_DECAY``).

After every optimizer step, for every floating-point entry ``v`` of the model's state dict (parameters and
BatchNorm statistics; integer counters are copied)::

    ema = d * ema + (1 - d) * v,        d = min(decay, (1 + n) / (10 + n))      n = updates done before this one

The ramp ``(1 + n) / (10 + n)`` (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) keeps the average from
being dominated by the random initialisation during the first ``~10 / (1 - decay)`` iterations.

:class:`ModelEMA` holds the averaged tensors (on the model's device), saves and restores them with
``state_dict()`` / ``load_state_dict()`` (plain tensors and numbers: ``torch.load(weights_only=True)``), and lends
them to the model with :meth:`ModelEMA.apply_to` (a context manager that swaps them in and puts the trained weights
back on exit) or :meth:`ModelEMA.copy_to` (for good). :class:`EMAHook` drives it from the training loop and makes the
EMA weights the final ones: they are what ``model_final.pth`` holds and what ``--eval_after`` evaluates.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, List

import torch
from torch import Tensor, nn

from ..utils.checkpoint import unwrap_model
from .hooks import HookBase

__all__ = ["ModelEMA", "EMAHook"]

logger = logging.getLogger("maskrcnn.ema")


class ModelEMA:
    """EMA of ``model``'s state dict (a DDP wrapper is unwrapped).

    Args:
        model: the model being trained; its state-dict tensors are read at every :meth:`update`.
        decay: in (0, 1), e.g. 0.999 (longer memory: closer to 1).

    Attributes: ``decay``, ``updates`` (number of :meth:`update` calls), ``shadow`` (name -> averaged tensor, the
    model's state-dict names).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average afresh from ``model``'s current weights (e.g. after loading a checkpoint)."""
        self.shadow: Dict[str, Tensor] = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self.updates = 0

    def _live(self, model: nn.Module) -> Dict[str, Tensor]:
        live = unwrap_model(model).state_dict(keep_vars=False)
        if live.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) - set(live))[:5]
            extra = sorted(set(live) - set(self.shadow))[:5]
            raise RuntimeError(f"ModelEMA: the model's state-dict keys changed since the EMA was created "
                               f"(missing {missing}, new {extra})")
        return live

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (ramped up over the first updates)."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        d = self.current_decay()
        live = self._live(model)
        ema: List[Tensor] = [self.shadow[k] for k in self._float_keys]
        cur: List[Tensor] = [live[k].detach().to(self.shadow[k].dtype) for k in self._float_keys]
        if ema:
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, cur, alpha=1.0 - d)
        for k, v in live.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (for good)."""
        unwrap_model(model).load_state_dict({k: v.clone() for k, v in self.shadow.items()})

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.apply_to(model):`` runs the block with the EMA weights in ``model`` and restores the trained
        weights afterwards (also when the block raises), e.g. for an evaluation during training."""
        backup = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                unwrap_model(model).load_state_dict(backup)

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": int(self.updates),
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``updates`` and the averaged tensors (same names as this EMA's model). The decay stays this
        EMA's (the config of the resumed run); a different one in ``state`` is reported."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            extra = sorted(set(shadow) - set(self.shadow))[:5]
            raise ValueError(f"EMA state does not fit the model (missing {missing}, unexpected {extra})")
        if float(state.get("decay", self.decay)) != self.decay:
            logger.warning("the checkpoint's EMA decay %s differs from SOLVER.EMA_DECAY = %s; the config's is used",
                           state.get("decay"), self.decay)
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])


class EMAHook(HookBase):
    """Updates ``ema`` after every iteration whose optimizer step ran (a skipped non-finite step changes nothing)
    and, once all iterations have run, copies the EMA weights into the model, so that hooks after it
    (:class:`~maskrcnn.engine.hooks.PeriodicCheckpointer`: ``model_final.pth``) and the final evaluation use them.
    Register it before the checkpointer. Registering it sets ``trainer.ema``, so that other hooks (an evaluation
    during training) can use ``with trainer.ema.apply_to(model):``.
    """

    def __init__(self, ema: ModelEMA):
        self.ema = ema
        self._trainer = None

    @property
    def trainer(self):
        return self._trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        # Set on registration: every hook sees trainer.ema from its before_train on, whatever the order.
        self._trainer = trainer
        if trainer is not None:
            trainer.ema = self.ema

    def after_step(self) -> None:
        if not getattr(self.trainer, "step_skipped", False):
            self.ema.update(self.trainer.model)

    def after_train(self) -> None:
        self.ema.copy_to(self.trainer.model)
        logger.info("training done: the model now holds the EMA weights (decay %g, %d updates)", self.ema.decay,
                    self.ema.updates)
