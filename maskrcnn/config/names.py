"""Detectron's dotted component names in configs: parsing body names and looking names up in registries.

Configs name components the way Detectron did, ``module.function`` (``"FPN.fpn_ResNet50_conv5_body"``,
``"fast_rcnn_heads.roi_2mlp_head"``); the module prefix is optional everywhere. This file is the one place that
knows how to read such names, so the config inference (``assert_and_infer_cfg``), the validation and the model
builders cannot disagree about them:

- :func:`parse_conv_body_name` reads a built-in ``MODEL.CONV_BODY`` name into ``(kind, depth, last stage)``;
- :func:`registry_lookup` finds a name in a builder registry (``CONV_BODY_REGISTRY``, ``BOX_HEAD_REGISTRY``,
  ``MASK_HEAD_REGISTRY``), with or without the module prefix, and fails with a :class:`ConfigError` that names
  the key, the value and every registered name.

Pure string handling: no torch, no model imports (the config package must not import the model).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional, TypeVar

from .errors import ConfigError

__all__ = ["ConvBodyName", "parse_conv_body_name", "strip_module_prefix", "find_in_registry", "registry_lookup"]

_RESNET_RE = re.compile(r"^(?:ResNet\.)?ResNet(\d+)_conv([45])_body$")
_FPN_RE = re.compile(r"^(?:FPN\.)?fpn_ResNet(\d+)_conv5_body$")

T = TypeVar("T")


class ConvBodyName(NamedTuple):
    """A parsed built-in body name: ``kind`` is ``"resnet"`` (one feature map) or ``"fpn"`` (a pyramid),
    ``depth`` the ResNet depth (18, 34, 50, 101, 152), ``stage`` the last ResNet stage (4 = C4, 5)."""

    kind: str
    depth: int
    stage: int


def parse_conv_body_name(name: str) -> ConvBodyName:
    """``(kind, depth, last stage)`` of a built-in ``MODEL.CONV_BODY`` name (module prefix optional).

    ``parse_conv_body_name("FPN.fpn_ResNet101_conv5_body") == ("fpn", 101, 5)``,
    ``parse_conv_body_name("ResNet50_conv4_body") == ("resnet", 50, 4)``.

    Raises:
        ConfigError: ``name`` is not of the form ``ResNet.ResNet<depth>_conv<4|5>_body`` or
            ``FPN.fpn_ResNet<depth>_conv5_body`` (custom bodies registered under other names are not parsed;
            callers that accept them catch this). The depth is not checked here: ResNet rejects unknown depths.
    """
    text = str(name)
    m = _RESNET_RE.match(text)
    if m:
        return ConvBodyName("resnet", int(m.group(1)), int(m.group(2)))
    m = _FPN_RE.match(text)
    if m:
        return ConvBodyName("fpn", int(m.group(1)), 5)
    raise ConfigError(f"MODEL.CONV_BODY = {name!r} is not a ResNet or FPN body name "
                      f"('ResNet.ResNet<depth>_conv<4|5>_body' or 'FPN.fpn_ResNet<depth>_conv5_body')")


def strip_module_prefix(name: str) -> str:
    """``"fast_rcnn_heads.roi_2mlp_head"`` -> ``"roi_2mlp_head"``; names without a dot are returned unchanged."""
    return name.split(".", 1)[1] if "." in name else name


def find_in_registry(registry: Mapping[str, T], name: str) -> Optional[str]:
    """The registry key ``name`` refers to, or None.

    An exact key wins; otherwise the key whose prefix-stripped form equals ``name``'s, when exactly one does
    (registries hold either prefixed keys, ``"ResNet.ResNet50_conv4_body"``, or bare ones, ``"roi_2mlp_head"``;
    both are found from either spelling). Two keys that strip to the same name make a bare name ambiguous: None.
    """
    name = str(name)
    if name in registry:
        return name
    bare = strip_module_prefix(name)
    matches = [k for k in registry if strip_module_prefix(k) == bare]
    return matches[0] if len(matches) == 1 else None


def registry_lookup(registry: Mapping[str, T], name: str, *, key: str, what: str) -> T:
    """``registry[k]`` for the key ``k`` that ``name`` (the value of config ``key``) refers to.

    Args:
        registry: name -> builder.
        name: the configured name, module prefix optional.
        key: the config key the name came from (``"MODEL.CONV_BODY"``), for the error message.
        what: what the registry holds (``"conv body"``), for the error message.

    Raises:
        ConfigError: naming ``key``, ``name`` and every registered name, when no key or more than one fits.
    """
    found = find_in_registry(registry, name)
    if found is not None:
        return registry[found]
    known = ", ".join(sorted(registry))
    bare = strip_module_prefix(str(name))
    clash = sorted(k for k in registry if strip_module_prefix(k) == bare)
    if len(clash) > 1:
        raise ConfigError(f"{key} = {name!r} is ambiguous: it could be any of {', '.join(clash)}; "
                          f"write the full name")
    raise ConfigError(f"{key} = {name!r} is not a registered {what} (unknown name); known: {known}")
