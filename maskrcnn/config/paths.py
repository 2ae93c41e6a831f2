"""Config files by path or by the name of a config shipped with the package.

``--cfg`` (every tool) and ``CfgNode.merge_from_file`` accept either a YAML file path or a packaged config name such
as ``baselines/e2e_mask_rcnn_R-50-FPN_1x`` (``.yaml`` optional; a leading ``configs/`` is ignored, so the checkout
paths of the README also work from an installed wheel in any folder).

The packaged configs are the repository's top-level ``configs/`` folder: an installed wheel carries it as
``maskrcnn/configs/`` (see ``setup.py``), a source checkout (editable install or ``PYTHONPATH``) reads it in place.
"""
from __future__ import annotations

import difflib
import os
from typing import List, Optional

from .errors import ConfigError

__all__ = ["packaged_configs_dir", "list_packaged_configs", "find_packaged_config", "resolve_config_path"]

_EXT = ".yaml"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../maskrcnn


def packaged_configs_dir() -> Optional[str]:
    """The folder of the packaged configs: ``maskrcnn/configs`` in an installed wheel, else the checkout's
    ``configs/`` next to the ``maskrcnn`` package (recognised by the ``pyproject.toml`` beside it); None if neither."""
    installed = os.path.join(_PACKAGE_DIR, "configs")
    if os.path.isdir(installed):
        return installed
    root = os.path.dirname(_PACKAGE_DIR)
    checkout = os.path.join(root, "configs")
    if os.path.isdir(checkout) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return checkout
    return None


def list_packaged_configs() -> List[str]:
    """Names of all packaged configs (``group/name`` without ``.yaml``, ``/``-separated), sorted."""
    top = packaged_configs_dir()
    if top is None:
        return []
    names = []
    for folder, _, files in os.walk(top):
        for f in files:
            if f.endswith(_EXT):
                rel = os.path.relpath(os.path.join(folder, f), top)
                names.append(rel[: -len(_EXT)].replace(os.sep, "/"))
    return sorted(names)


def _normalise_name(name: str) -> str:
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    return name[: -len(_EXT)] if name.endswith(_EXT) else name


def find_packaged_config(name: str) -> Optional[str]:
    """Path of the packaged config called ``name`` (with or without ``.yaml`` or a leading ``configs/``), or None."""
    if os.path.isabs(name):
        return None
    key = _normalise_name(name)
    if key in list_packaged_configs():
        return os.path.join(packaged_configs_dir(), *key.split("/")) + _EXT
    return None


def resolve_config_path(name_or_path: str) -> str:
    """The config file to read for ``name_or_path``: an existing file wins, else a packaged config of that name.

    Raises ConfigError (``config file not found: ...``) listing the closest packaged names when neither exists.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        return name_or_path
    found = find_packaged_config(name_or_path)
    if found is not None:
        return found
    names = list_packaged_configs()
    if not names:
        raise ConfigError(f"config file not found: {name_or_path} (and no packaged configs are installed)")
    key = _normalise_name(name_or_path)
    # Names that contain what was typed (e.g. "R-50-FPN_1x"), then the spelling-closest full and base names.
    close = [n for n in names if key and key.lower() in n.lower()][:5]
    by_base = {n.rsplit("/", 1)[-1]: n for n in names}
    for cand in (difflib.get_close_matches(key, names, n=3, cutoff=0.6)
                 + [by_base[b] for b in difflib.get_close_matches(key.rsplit("/", 1)[-1], list(by_base), n=3,
                                                                  cutoff=0.6)]):
        if cand not in close:
            close.append(cand)
    if close:
        hint = f"closest packaged configs: {', '.join(close)}"
    else:
        hint = f"packaged configs: {', '.join(names)}"
    raise ConfigError(f"config file not found: {name_or_path} (neither a file nor a packaged config name; {hint})")
