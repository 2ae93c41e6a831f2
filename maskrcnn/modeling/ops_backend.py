"""A model's own ops backend: ``OPS_BACKEND`` of the config a model was built from selects the kernels its
``nms`` / ``roi_align`` / ``roi_pool`` calls dispatch to, for that model only.

The choice is scoped, not process-wide: while the model (or one of its modules called directly, e.g.
``model.Box_Head(features, rois)`` or ``model.RPN(...)``) runs, :func:`maskrcnn.ops._backend.get_backend` returns
the model's backend on that thread, so two models built from different configs each run their own. An explicit
:func:`maskrcnn.ops._backend.set_backend` / ``use_backend`` still wins (code over config), and ``OPS_BACKEND: auto``
installs nothing: the ``MASKRCNN_OPS_BACKEND`` environment variable, else the ``auto`` rule, then decides.
"""
from __future__ import annotations

from typing import Iterable, List

from torch import nn

from ..ops import _backend

__all__ = ["apply_ops_backend", "BACKBONE_ATTRS"]

#: Children that dispatch none of the three ops (convolutions only): left without hooks, so that a backend costs
#: nothing per backbone layer. Called through the model they still run inside its scope.
BACKBONE_ATTRS = ("Conv_Body",)


def _hooked_modules(model: nn.Module, skip: Iterable[str]) -> List[nn.Module]:
    skipped = [getattr(model, name) for name in skip if isinstance(getattr(model, name, None), nn.Module)]
    skipped_ids = {id(m) for s in skipped for m in s.modules()}
    return [m for m in model.modules() if id(m) not in skipped_ids]


def apply_ops_backend(model: nn.Module, name: str, skip: Iterable[str] = BACKBONE_ATTRS) -> str:
    """Run ``model`` and its modules (except the ``skip`` children) with ops backend ``name``.

    Args:
        model: the model (e.g. :class:`~maskrcnn.modeling.generalized_rcnn.Generalized_RCNN`).
        name: ``"native"``, ``"torchvision"`` or ``"auto"`` (config ``OPS_BACKEND``); ``"auto"`` installs nothing.
        skip: attribute names of children to leave without hooks.

    Returns the validated name (also stored as ``model.ops_backend``). Raises ``ValueError`` for an unknown name.
    Each hooked module enters the scope in a forward pre-hook and leaves it in a forward hook that also runs when
    the forward raises, so an exception never leaves the backend set.
    """
    backend = _backend._validate(name, "OPS_BACKEND")
    model.ops_backend = backend
    if backend == "auto":
        return backend

    enter, leave = _EnterScope(backend), _LeaveScope()
    for module in _hooked_modules(model, skip):
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
    return backend


# Hooks are module-level classes, not closures, so that a model carrying them still pickles (torch.save(model)).
class _EnterScope:
    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, _module: nn.Module, _inputs) -> None:
        _backend.push_scope(self.backend)


class _LeaveScope:
    def __call__(self, _module: nn.Module, _inputs, _output) -> None:
        _backend.pop_scope()
