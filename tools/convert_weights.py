#!/usr/bin/env python
"""Convert a model-zoo weight file into maskrcnn's checkpoint format.

    python tools/convert_weights.py --src detectron --input model_final.pkl --output ours.pth \\
        --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml

``--src`` is one of ``detectron``, ``detectron.pytorch``, ``torchvision``, ``detectron2`` (``auto`` detects it).
The output is ``torch.save({"model": state_dict, "cfg": yaml or None, "source": {"format", "file", "notes"}})`` and
loads with ``torch.load(path, weights_only=True)`` and ``maskrcnn.utils.checkpoint.load_ckpt``. Input files are
read safely (restricted unpickler for ``.pkl``, ``weights_only=True`` for torch files): a file that would run
code is refused.

``--cfg`` names the config the weights are for: it places res5 (C4 vs FPN), reorders detectron2's C4 anchors to
the config's RPN.SIZES x RPN.ASPECT_RATIOS, flips conv1's input channels when the config's PIXEL_ORDER differs from
the weights' (``--flip-input-channels`` / ``--no-flip-input-channels`` force it), and is stored in the output.
The notes printed at the end say which config values the weights expect.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.utils.weights.formats import FORMATS, WeightsConversionError, convert_file  # noqa: E402
from maskrcnn.utils.weights.safe_pickle import UnsafeWeightsError, WeightsFileError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, choices=FORMATS + ("auto",), help="format of the input file")
    p.add_argument("--input", required=True, help="model-zoo weight file (.pkl / .pth)")
    p.add_argument("--output", required=True, help="where to write our checkpoint (.pth)")
    p.add_argument("--cfg", default=None, help="config file of the model the weights are for")
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--flip-input-channels", dest="flip", action="store_true", default=None,
                      help="reverse conv1's input channels (BGR <-> RGB)")
    flip.add_argument("--no-flip-input-channels", dest="flip", action="store_false",
                      help="never reverse conv1's input channels")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = None
    if args.cfg is not None or args.opts:
        from maskrcnn.config import get_cfg

        cfg = get_cfg()
        if args.cfg is not None:
            cfg.merge_from_file(args.cfg)
        if args.opts:
            cfg.merge_from_list(args.opts)
    src = None if args.src == "auto" else args.src
    try:
        notes = convert_file(args.input, args.output, src, cfg, flip_input_channels=args.flip)
    except (UnsafeWeightsError, WeightsFileError, WeightsConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    for note in notes:
        print(f"  - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
