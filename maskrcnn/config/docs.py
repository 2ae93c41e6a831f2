"""Generate ``docs/config.md`` from the key table in :mod:`maskrcnn.config.defaults`.

Run ``python -m maskrcnn.config.docs > docs/config.md``; a test checks the file is up to date.
"""
from __future__ import annotations

import json

from . import defaults


def _fmt(value) -> str:
    if isinstance(value, float):
        # repr is exact and shortest: 1e-14 stays 1e-14 (rounding printed Detectron's EPS as 0.0).
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, str, bool)) else repr(value)


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `maskrcnn/config/defaults.py` by `python -m maskrcnn.config.docs`; do not edit by hand.",
        "Every key can be set in a YAML file (which may inherit with `_BASE_: other.yaml`) or on the command line",
        "with `--set KEY VALUE`. Unknown keys, wrong types and impossible values fail at load time naming the key,",
        "the value and the file.",
        "",
    ]
    sections = {}
    top = []
    for key, doc in defaults.KEY_DOCS.items():
        if "." in key:
            # Sub-sections (TEST.BBOX_AUG) get their own table after their parent's.
            sections.setdefault(key.rsplit(".", 1)[0], []).append((key, doc))
        else:
            top.append((key, doc))
    lines += ["## Top level", "", "| key | default | meaning |", "|---|---|---|"]
    node = defaults._C
    for key, doc in top:
        lines.append(f"| `{key}` | `{_fmt(node[key])}` | {doc} |")
    for sec, items in sections.items():
        lines += ["", f"## {sec}", "", defaults.SECTION_DOCS.get(sec, ""), "", "| key | default | meaning |",
                  "|---|---|---|"]
        for key, doc in items:
            value = node
            for p in key.split("."):
                value = value[p]
            lines.append(f"| `{key}` | `{_fmt(value)}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
