"""Train or test on a modified copy of a synthetic-family variant (a diagnostic: which property makes a variant hard).

    python benchmarks/probe_variant.py mixed mixnc crowd_fraction=0.0 empty_fraction=0.0 -- \\
        train --auto --dataset synthetic:mixnc:train --budget 5min --output_dir OUT
    python benchmarks/probe_variant.py mixed mixnc crowd_fraction=0.0 empty_fraction=0.0 -- \\
        test --cfg OUT/config.yaml --load_ckpt OUT/model_final.pth --dataset synthetic:mixnc:val

``BASE NEW KEY=VALUE ...`` registers ``NEW`` as ``BASE`` with the given :class:`VariantSpec` fields replaced (values
are Python literals, e.g. ``"classes=('rectangle','ring')"``), for this process only; after ``--``, ``train`` or
``test`` and the arguments of ``tools/train_net.py`` / ``tools/test_net.py``. The copy's items differ from the
base's (the seed includes the variant's name). Used for docs/auto.md, "Not reached".
"""
from __future__ import annotations

import ast
import dataclasses
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def register(base: str, new: str, changes: Dict[str, object]):
    """Register variant ``new``: ``base``'s spec with ``changes``; returns the new :class:`VariantSpec`."""
    from maskrcnn.data.datasets.synthetic_family import VARIANTS

    if base not in VARIANTS:
        raise SystemExit(f"probe_variant: unknown base variant {base!r}; known: {list(VARIANTS)}")
    spec = dataclasses.replace(VARIANTS[base], name=new, **changes)
    spec.check()
    VARIANTS[new] = spec
    return spec


def main(argv: List[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    cut = argv.index("--") if "--" in argv else -1
    if cut < 2 or cut + 1 >= len(argv):  # BASE NEW [KEY=VALUE ...] -- MODE [ARGS ...]
        raise SystemExit(__doc__)
    changes = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in argv[2:cut])}
    print("probe variant:", register(argv[0], argv[1], changes), flush=True)
    mode, rest = argv[cut + 1], argv[cut + 2:]
    if mode == "train":
        from maskrcnn.cli.train_net import main as run
    elif mode == "test":
        from maskrcnn.cli.test_net import main as run
    else:
        raise SystemExit(f"probe_variant: after -- comes 'train' or 'test', got {mode!r}")
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
