"""Every config key does something: each key of the defaults is read somewhere in ``maskrcnn/`` or ``tools/``, or is
listed (with its reason) in ``DETECTRON_COMPAT_KEYS``, whose non-default values log a warning.

A key counts as read when the code (comments and docstrings removed) accesses it as an attribute
(``cfg.MODEL.MASK_ON``, ``c.TRAIN.AMP``), through a local alias of its section (``f = cfg.FPN`` or
``t, s = cfg.TRAIN, cfg.TEST``, then ``f.USE_GN``), through ``SECTION.get("KEY")`` / ``getattr(cfg.SECTION, "KEY")``,
or names it as a whole dotted string literal (``_cfg_value(cfg, "TEST.AMP")``). The config package's own files do
not count: declaring, documenting, loading or validating a key is not using it.
"""
from __future__ import annotations

import ast
import io
import logging
import os
import re
import tokenize
from typing import Dict, Iterable, List, Set

import pytest

from maskrcnn.config import assert_and_infer_cfg, get_cfg
from maskrcnn.config.config import warn_compat_keys
from maskrcnn.config.defaults import DETECTRON_COMPAT_KEYS, KEY_DOCS

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCANNED_DIRS = ("maskrcnn", "tools")
# Declaring (defaults.py), documenting (docs.py), merging (config.py) and validating (validate.py) a key is not
# using it.
NOT_READERS = tuple(os.path.join("maskrcnn", "config", f) for f in ("defaults.py", "docs.py", "config.py",
                                                                      "validate.py"))


# Python >= 3.12 tokenizes f-strings into parts; their literal text is message text, not code.
_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", -1)


def code_and_strings(source: str):
    """``(code, strings)`` of a Python source: the code with every comment and string literal blanked out (so a
    docstring that mentions a key does not count), and the values of the string literals."""
    code: List[str] = []
    strings: List[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or tok.type == _FSTRING_MIDDLE:
            continue
        if tok.type == tokenize.STRING:
            body = re.sub(r"^[A-Za-z]*", "", tok.string)
            strings.append(body.strip("'\""))
            code.append('""')
            continue
        code.append(tok.string)
    return " ".join(code), strings


def load_sources(root: str = REPO, dirs: Iterable[str] = SCANNED_DIRS) -> Dict[str, str]:
    """``{relative path: source}`` of the Python files under ``dirs`` except :data:`NOT_READERS`."""
    out = {}
    for d in dirs:
        for dirpath, _dirs, files in os.walk(os.path.join(root, d)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                if rel in NOT_READERS:
                    continue
                with open(path, encoding="utf-8") as f:
                    out[rel] = f.read()
    return out


def _reads(key: str, code: str, strings: List[str], aliases: Dict[str, Set[str]]) -> bool:
    parts = key.split(".")
    leaf = re.escape(parts[-1])
    if key in strings:
        return True
    if len(parts) == 1:
        # Top-level keys have distinctive upper-case names: any attribute access (cfg.OUTPUT_DIR, c.PIXEL_MEANS).
        return re.search(r"\.\s*%s\b" % leaf, code) is not None
    # The key's own section: MODEL for MODEL.MASK_ON, BBOX_AUG for TEST.BBOX_AUG.H_FLIP (cfg.TEST.BBOX_AUG.H_FLIP,
    # `aug = cfg.TEST.BBOX_AUG` ... `aug.H_FLIP`).
    section = re.escape(parts[-2])
    patterns = [
        r"\b%s\s*\.\s*%s\b" % (section, leaf),                                 # cfg.SECTION.KEY
        r"\b%s\s*\.\s*get\s*\(\s*\"\"" % section,                              # cfg.SECTION.get("KEY", ...)
        r"getattr\s*\(\s*(?:\w+\s*\.\s*)*%s\s*,\s*\"\"" % section,             # getattr(cfg.SECTION, "KEY")
    ]
    if re.search(patterns[0], code):
        return True
    if (re.search(patterns[1], code) or re.search(patterns[2], code)) and parts[-1] in strings:
        return True
    # A local alias of the section: `f = cfg.FPN` or `t, s = cfg.TRAIN, cfg.TEST` ... `f.USE_GN`.
    for alias in aliases.get(parts[-2], ()):
        if re.search(r"\b%s\s*\.\s*%s\b" % (re.escape(alias), leaf), code):
            return True
    return False


def section_aliases(source: str) -> Dict[str, Set[str]]:
    """``{section: {local names}}`` bound to ``<anything>.SECTION`` by a plain or tuple assignment in ``source``."""
    out: Dict[str, Set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple) and \
                    len(target.elts) == len(node.value.elts):
                pairs = list(zip(target.elts, node.value.elts))
            for name, value in pairs:
                if isinstance(name, ast.Name) and isinstance(value, ast.Attribute) and value.attr.isupper():
                    out.setdefault(value.attr, set()).add(name.id)
    return out


def unread_keys(keys: Iterable[str], sources: Dict[str, str]) -> List[str]:
    """The keys that no file of ``sources`` reads (see the module docstring for what counts as a read)."""
    parsed = [code_and_strings(src) + (section_aliases(src),) for src in sources.values()]
    return [k for k in keys if not any(_reads(k, code, strings, aliases) for code, strings, aliases in parsed)]


# --- the checker itself -------------------------------------------------------------------------------------------
def test_checker_finds_a_dead_key_and_each_way_of_reading():
    sources = {
        "a.py": '"""Docstring naming MODEL.DEAD_IN_DOCSTRING and cfg.MODEL.DEAD_IN_DOCSTRING."""\n'
                "x = cfg.MODEL.ATTR  # cfg.MODEL.DEAD_IN_COMMENT\n"
                "f = cfg.FPN\n"
                "y = f.ALIASED\n"
                "t, s = cfg.TRAIN, self.cfg.SOLVER\n"
                "y2 = t.TUPLE_ALIASED + s.SELF_TUPLE_ALIASED\n"
                "z = cfg.TEST.get('GOT', 0)\n"
                "w = getattr(cfg.TRAIN, 'GETATTR')\n"
                "v = _cfg_value(cfg, 'SOLVER.DOTTED')\n"
                "u = cfg.TOP_LEVEL\n"
                "aug = cfg.TEST.BBOX_AUG\n"
                "n = aug.NESTED_ALIASED + cfg.TEST.MASK_AUG.NESTED\n"
                "msg = f'{x} MODEL.DEAD_IN_MESSAGE'\n",
    }
    keys = ["MODEL.ATTR", "FPN.ALIASED", "TRAIN.TUPLE_ALIASED", "SOLVER.SELF_TUPLE_ALIASED", "TEST.GOT",
            "TRAIN.GETATTR", "SOLVER.DOTTED", "TOP_LEVEL", "TEST.BBOX_AUG.NESTED_ALIASED", "TEST.MASK_AUG.NESTED",
            "MODEL.DEAD_IN_DOCSTRING", "MODEL.DEAD_IN_COMMENT", "MODEL.DEAD_IN_MESSAGE", "MODEL.NEVER", "NEVER_TOP",
            "FPN.NOT_ALIASED", "TEST.BBOX_AUG.NESTED"]
    assert unread_keys(keys, sources) == ["MODEL.DEAD_IN_DOCSTRING", "MODEL.DEAD_IN_COMMENT",
                                          "MODEL.DEAD_IN_MESSAGE", "MODEL.NEVER", "NEVER_TOP", "FPN.NOT_ALIASED",
                                          "TEST.BBOX_AUG.NESTED"]


def test_checker_catches_a_new_dead_key_in_the_real_sources():
    sources = load_sources()
    assert unread_keys(["MODEL.MASK_ON", "MODEL.SOME_NEW_DEAD_KEY"], sources) == ["MODEL.SOME_NEW_DEAD_KEY"]


def test_config_package_files_are_not_readers():
    sources = load_sources()
    assert sources, "no sources found"
    assert not any(rel in sources for rel in NOT_READERS)
    assert os.path.join("maskrcnn", "modeling", "rpn", "rpn.py") in sources


# --- the real keys ----------------------------------------------------------------------------------------------
def test_every_key_is_read_or_listed_for_detectron_compatibility():
    unread = unread_keys(KEY_DOCS, load_sources())
    not_listed = [k for k in unread if k not in DETECTRON_COMPAT_KEYS]
    assert not not_listed, (f"config keys read by nothing in {SCANNED_DIRS}: {not_listed}; make them work, remove "
                            f"them, or list them in maskrcnn.config.defaults.DETECTRON_COMPAT_KEYS with the reason")


def test_compat_keys_are_real_keys_read_by_nothing():
    assert set(DETECTRON_COMPAT_KEYS) <= set(KEY_DOCS)
    # A key that the code reads does not belong in the list (its value has an effect; no warning is due).
    read = sorted(set(DETECTRON_COMPAT_KEYS) - set(unread_keys(DETECTRON_COMPAT_KEYS, load_sources())))
    assert not read, f"listed in DETECTRON_COMPAT_KEYS but read by the code: {read}"
    for key, reason in DETECTRON_COMPAT_KEYS.items():
        assert reason.strip(), key


def test_non_default_compat_key_warns_naming_key_and_file(tmp_path, caplog):
    path = tmp_path / "detectron.yaml"
    path.write_text("EPS: 1.0e-10\nMODEL:\n  TYPE: generalized_rcnn\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    with caplog.at_level(logging.WARNING, logger="maskrcnn.config.config"):
        assert_and_infer_cfg(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "EPS = 1e-10 has no effect" in messages[0] and str(path) in messages[0]
    assert cfg.EPS == 1e-10  # accepted, not changed


def test_default_compat_values_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="maskrcnn.config.config"):
        assert warn_compat_keys(get_cfg()) == []
    assert not caplog.records


@pytest.mark.parametrize("key", ["MODEL.FASTER_RCNN", "RPN.RPN_ON"])
def test_precomputed_proposal_switches_are_rejected(key):
    from maskrcnn.config import ConfigError

    cfg = get_cfg()
    cfg.merge_from_list([key, "False"])
    with pytest.raises(ConfigError, match=rf"<command line>.*{re.escape(key)} = False is not allowed.*precomputed "
                                          r"proposals"):
        assert_and_infer_cfg(cfg, source="<command line>")
