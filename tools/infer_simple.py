#!/usr/bin/env python
"""Run a trained model on images and draw its detections: a shim over ``maskrcnn.cli.infer`` (see there).

    python tools/infer_simple.py --cfg CFG --load_ckpt MODEL.pth (--images a.jpg b.png | --image_dir DIR) \\
        --output_dir OUT [--thresh 0.7] [--set KEY VALUE ...] [--no_cuda]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
