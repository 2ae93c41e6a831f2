"""benchmarks/probe_variant.py: a modified copy of a variant, registered and readable through the catalog."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import probe_variant  # noqa: E402

from maskrcnn.data.catalog import build_dataset  # noqa: E402
from maskrcnn.data.datasets.synthetic_family import VARIANTS  # noqa: E402


def test_register_a_modified_copy():
    try:
        spec = probe_variant.register("mixed", "probe_nocrowd", {"crowd_fraction": 0.0, "empty_fraction": 0.0,
                                                                  "classes": ("ring", "star")})
        assert spec.classes == ("ring", "star") and spec.height == VARIANTS["mixed"].height
        data = build_dataset("synthetic:probe_nocrowd:val", is_train=False)
        targets = [data[i][1] for i in range(12)]
        assert all(int(t["iscrowd"].sum()) == 0 and len(t["labels"]) >= 1 for t in targets)
        assert {int(label) for t in targets for label in t["labels"]} <= {1, 2}
        with pytest.raises(ValueError, match="classes"):
            probe_variant.register("mixed", "probe_bad", {"classes": ("blob",)})
    finally:
        VARIANTS.pop("probe_nocrowd", None)
        VARIANTS.pop("probe_bad", None)


def test_usage_errors():
    with pytest.raises(SystemExit):
        probe_variant.main(["mixed", "x", "crowd_fraction=0.0"])  # no "--"
    with pytest.raises(SystemExit, match="'train' or 'test'"):
        probe_variant.main(["mixed", "probe_x", "--", "evaluate"])
    VARIANTS.pop("probe_x", None)
    # --help prints the usage and succeeds (every benchmark's --help exits 0)
    assert probe_variant.main(["--help"]) == 0
