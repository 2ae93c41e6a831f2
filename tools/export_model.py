#!/usr/bin/env python
"""Export a trained model to TorchScript, ONNX or torch.export: a shim over ``maskrcnn-export``
(:mod:`maskrcnn.cli.export`); see ``python tools/export_model.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
