"""State-dict keys of a child module without the child's name: ``model.roi_heads.Box_Head.fc6.weight`` is saved and
loaded as ``Box_Head.fc6.weight``.

``Generalized_RCNN`` groups its per-RoI heads in a ``roi_heads`` module, but Detectron.pytorch checkpoints, every
weight converter in ``maskrcnn/utils/weights`` and the checkpoints written before that module existed name the heads
at the top level. :func:`flatten_child_state_dict` keeps those keys: ``state_dict()`` drops the child's prefix, and
``load_state_dict()`` accepts both the flat keys and the nested ones (missing / unexpected keys are reported flat).
Parameters, ``named_parameters()`` and module paths are unchanged (``roi_heads.Box_Head.fc6.weight``).

The hooks are plain picklable objects, so the model survives ``copy.deepcopy`` and ``torch.save(model)``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Set

from torch import nn

__all__ = ["flatten_child_state_dict"]


def _own_names(module: nn.Module) -> Set[str]:
    return set(module._modules) | set(module._parameters) | set(module._buffers)


class _Hook:
    # Callable objects, not bound methods: torch marks its hooks with an attribute.
    def __init__(self, name: str):
        self.name = name


class _SaveFlat(_Hook):
    """``state_dict`` post-hook: ``<prefix><name>.X`` -> ``<prefix>X`` (and the version metadata alike)."""

    def __call__(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict) -> None:
        inner = prefix + self.name + "."
        if not any(k.startswith(inner) for k in state_dict):
            return
        items = list(state_dict.items())
        state_dict.clear()  # rebuilt in the same order, so parameters keep their positions
        for key, value in items:
            state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            metadata.pop(inner[:-1], None)
            for key in [k for k in metadata if k.startswith(inner)]:
                metadata[prefix + key[len(inner):]] = metadata.pop(key)


class _LoadFlat(_Hook):
    """``load_state_dict`` pre-hook: ``<prefix>X`` -> ``<prefix><name>.X`` for the child's own names ``X``."""

    def __call__(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict,
                 strict: bool, missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        child = module._modules.get(self.name)
        if child is None:
            return
        movable = _own_names(child) - _own_names(module)
        # Version metadata is left alone (it is the caller's object): the heads load as from a plain dict, which is
        # what converters and checkpoints hand over anyway.
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            first = key[len(prefix):].split(".", 1)[0]
            if first in movable:
                state_dict[prefix + self.name + "." + key[len(prefix):]] = state_dict.pop(key)


class _ReportFlat(_Hook):
    """``load_state_dict`` post-hook: missing / unexpected keys named as ``state_dict()`` names them."""

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        nested = re.compile(r"(^|\.)" + re.escape(self.name) + r"\.")
        for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
            keys[:] = [nested.sub(r"\1", k, count=1) for k in keys]


def flatten_child_state_dict(module: nn.Module, name: str) -> None:
    """Save and load the state of ``module``'s child ``name`` as if its children were ``module``'s own.

    The child's sub-module, parameter and buffer names must not collide with ``module``'s (a key of the parent's
    own, e.g. ``RPN.*``, always goes to the parent).
    """
    module.register_state_dict_post_hook(_SaveFlat(name))
    module.register_load_state_dict_pre_hook(_LoadFlat(name))
    module.register_load_state_dict_post_hook(_ReportFlat(name))
