"""Loading, merging and validating configs.

Two styles are supported:

* detectron2 style: ``cfg = get_cfg(); cfg.merge_from_file(path); cfg.merge_from_list([...])``;
* Detectron style: the module-level global ``cfg`` with ``cfg_from_file``, ``cfg_from_list`` and
  ``assert_and_infer_cfg``.

A config is named by a file path or by the name of a packaged config (``baselines/e2e_mask_rcnn_R-50-FPN_1x``, see
:mod:`maskrcnn.config.paths`). YAML files may name a ``_BASE_`` file (relative to themselves, else a packaged config
name) that is loaded first. Every merge checks keys and types against the defaults and fails with a
:class:`ConfigError` naming the key, the value and the file.
"""
from __future__ import annotations

import ast
import copy
import logging
import os
from typing import Any, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as _CN

from . import defaults as _defaults
from .errors import ConfigError
from .names import parse_conv_body_name
from .paths import find_packaged_config, resolve_config_path
from .validate import validate_cfg

__all__ = [
    "CfgNode", "ConfigError", "get_cfg", "cfg", "cfg_from_file", "cfg_from_list", "assert_and_infer_cfg",
    "merge_cfg_from_cfg", "load_yaml_with_base", "reset_global_cfg", "warn_compat_keys",
]

BASE_KEY = "_BASE_"

_logger = logging.getLogger(__name__)


class CfgNode(_CN):
    """yacs ``CfgNode`` whose merges are checked (keys, types) and report the source file."""

    def merge_from_file(self, cfg_filename: str) -> None:
        data = load_yaml_with_base(cfg_filename)
        _merge_dict(self, data, source=cfg_filename, prefix="")
        # Remembered (outside the key space) so that later validation errors can name the file.
        self.__dict__.setdefault("_sources", []).append(str(cfg_filename))

    @property
    def sources(self) -> List[str]:
        """Files merged into this config, in order."""
        return list(self.__dict__.get("_sources", []))

    def merge_from_other_cfg(self, cfg_other: _CN) -> None:
        _merge_dict(self, _to_dict(cfg_other), source="<config object>", prefix="")

    def merge_from_list(self, cfg_list: Sequence[Any]) -> None:
        _merge_list(self, cfg_list, source="<command line>")

    def dump(self, **kwargs) -> str:  # yacs dumps tuples oddly; lists round-trip
        return yaml.safe_dump(_to_dict(self), sort_keys=False, **kwargs)


def _to_dict(node: Any) -> Any:
    if isinstance(node, _CN):
        return {k: _to_dict(v) for k, v in node.items()}
    if isinstance(node, tuple):
        return [_to_dict(v) for v in node]
    if isinstance(node, list):
        return [_to_dict(v) for v in node]
    return node


def _from_cn(node: _CN) -> CfgNode:
    out = CfgNode()
    for k, v in node.items():
        out[k] = _from_cn(v) if isinstance(v, _CN) else copy.deepcopy(v)
    return out


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of the defaults."""
    return _from_cn(_defaults._C)


def load_yaml_with_base(filename: str, _seen: Optional[List[str]] = None) -> dict:
    """Read a YAML config, first loading (recursively) the file named by its ``_BASE_`` key.

    ``filename`` is a path or a packaged config name (:func:`maskrcnn.config.paths.resolve_config_path`); a relative
    ``_BASE_`` is looked up next to the file that names it, then among the packaged configs.
    Raises ConfigError naming the file when it is missing, unreadable, not a mapping, or inherits in a cycle.
    """
    if _seen is None:
        filename = resolve_config_path(filename)
    filename = os.path.abspath(filename)
    seen = list(_seen or [])
    if filename in seen:
        raise ConfigError(f"{filename}: _BASE_ inheritance cycle: {' -> '.join(seen + [filename])}")
    seen.append(filename)
    if not os.path.isfile(filename):
        raise ConfigError(f"config file not found: {filename}")
    try:
        with open(filename, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{filename}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: a config file must be a mapping of sections, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{filename}: _BASE_ must be a file path string, got {base!r}")
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(filename), base)
    if not os.path.isfile(base_path):
        # A user's config may inherit from a shipped one by name (`_BASE_: baselines/e2e_mask_rcnn_R-50-FPN_1x`).
        base_path = find_packaged_config(base) or base_path
    merged = load_yaml_with_base(base_path, seen)
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise ConfigError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            value = list(value)
            if default:
                proto = default[0]
                try:
                    return [_coerce(key, v, proto, source) for v in value]
                except ConfigError:
                    raise ConfigError(
                        f"{source}: {key}: wrong element type in {value!r}; expected a list of "
                        f"{type(proto).__name__}") from None
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and default:
            # A scalar where a list of numbers is expected (e.g. TRAIN.SCALES: 800) is a one-element list.
            return [_coerce(key, value, default[0], source)]
    elif default is None:
        return value
    raise ConfigError(
        f"{source}: {key}: wrong type: got {value!r} ({type(value).__name__}), "
        f"expected {type(default).__name__} like the default {default!r}")


def _merge_dict(node: _CN, data: dict, source: str, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    for k, v in data.items():
        full = prefix + str(k)
        if k not in node:
            hint = _close_matches(full)
            raise ConfigError(f"{source}: unknown config key {full!r}{hint}")
        cur = node[k]
        if isinstance(cur, _CN):
            _merge_dict(cur, v, source, full + ".")
        else:
            node[k] = _coerce(full, v, cur, source)


def _close_matches(full_key: str) -> str:
    import difflib
    cands = difflib.get_close_matches(full_key, list(_defaults.KEY_DOCS), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(cands)}?)" if cands else ""


def _parse_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def _merge_list(node: _CN, cfg_list: Sequence[Any], source: str) -> None:
    if len(cfg_list) % 2 != 0:
        raise ConfigError(f"{source}: key/value list has an odd length: {list(cfg_list)!r}")
    for key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
        parts = str(key).split(".")
        cur = node
        for i, p in enumerate(parts[:-1]):
            if p not in cur or not isinstance(cur[p], _CN):
                raise ConfigError(f"{source}: unknown config key {key!r}{_close_matches(str(key))}")
            cur = cur[p]
        leaf = parts[-1]
        if leaf not in cur or isinstance(cur[leaf], _CN):
            raise ConfigError(f"{source}: unknown config key {key!r}{_close_matches(str(key))}")
        cur[leaf] = _coerce(str(key), _parse_value(raw), cur[leaf], source)


def merge_cfg_from_cfg(dst: _CN, src: _CN) -> None:
    _merge_dict(dst, _to_dict(src), source="<config object>", prefix="")


# --- Detectron-style global config -------------------------------------------------------------------------------

#: The global config that Detectron-style code mutates in place.
cfg: CfgNode = get_cfg()


def reset_global_cfg() -> CfgNode:
    """Put the global ``cfg`` back to the defaults (unfrozen), in place; returns it."""
    cfg.defrost()
    fresh = get_cfg()
    for k in list(cfg.keys()):
        if k not in fresh:
            del cfg[k]
    for k, v in fresh.items():
        cfg[k] = v
    cfg.__dict__["_sources"] = []
    return cfg


def cfg_from_file(filename: str, config: Optional[CfgNode] = None) -> None:
    """Merge a YAML file (with ``_BASE_`` support) into ``config`` (default: the global ``cfg``)."""
    (cfg if config is None else config).merge_from_file(filename)


def cfg_from_list(cfg_list: Sequence[Any], config: Optional[CfgNode] = None) -> None:
    """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` (values as strings or Python objects)."""
    (cfg if config is None else config).merge_from_list(cfg_list)


def warn_compat_keys(config: _CN, source: str = "<config>") -> List[str]:
    """Log a warning for each key of :data:`~maskrcnn.config.defaults.DETECTRON_COMPAT_KEYS` set to a value other
    than its default (such a key is read by nothing, so the value has no effect); returns the keys warned about."""
    warned = []
    for key, reason in _defaults.DETECTRON_COMPAT_KEYS.items():
        value, default = _get_dotted(config, key), _get_dotted(_defaults._C, key)
        if value != default:
            _logger.warning("%s: %s = %r has no effect (kept only so that Detectron config files load: %s); "
                            "remove it or set it back to %r", source, key, value, reason, default)
            warned.append(key)
    return warned


def _get_dotted(node: _CN, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


def assert_and_infer_cfg(config: Optional[CfgNode] = None, make_immutable: bool = True,
                         source: Optional[str] = None) -> CfgNode:
    """Infer derived keys (FPN from the body name, block type from the depth) and validate every value.

    Raises ConfigError naming the key and value of the first impossible setting.
    """
    c = cfg if config is None else config
    if c.is_frozen():
        return c
    try:
        body = parse_conv_body_name(c.MODEL.CONV_BODY)
    except ConfigError:
        body = None  # a custom CONV_BODY_REGISTRY body declares FPN.FPN_ON and RESNETS.* itself; validated below
    if body is not None:
        if body.kind == "fpn":
            c.FPN.FPN_ON = True
        if body.depth in (18, 34):
            c.RESNETS.TRANS_FUNC = "basic_transformation"
    if source is None:
        files = c.__dict__.get("_sources", [])
        source = ", ".join(files) if files else "<config>"
    validate_cfg(c, source=source)
    warn_compat_keys(c, source)
    if make_immutable:
        c.freeze()
    return c

