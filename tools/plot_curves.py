#!/usr/bin/env python
"""Checkout shim: ``python tools/plot_curves.py OUTPUT_DIR [...] -o curves.png`` runs ``maskrcnn-plot``
(maskrcnn/cli/plot.py)."""
import os
import sys

# The checkout's maskrcnn, also when it is not installed; OMP_WAIT_POLICY before torch loads (see maskrcnn.cli).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from maskrcnn.cli.plot import main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
