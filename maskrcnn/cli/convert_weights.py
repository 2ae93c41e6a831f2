"""Convert a model-zoo weight file into maskrcnn's checkpoint format.

    maskrcnn-convert --src detectron --input model_final.pkl --output ours.pth \\
        --cfg baselines/e2e_mask_rcnn_R-50-FPN_1x

(``python tools/convert_weights.py ...`` in a checkout.)

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
import sys

from ..config import ConfigError
from ..utils.weights.formats import FORMATS, WeightsConversionError, convert_file
from ..utils.weights.safe_pickle import UnsafeWeightsError, WeightsFileError
from .common import add_cfg_argument, config_error_exit, load_cfg_file

__all__ = ["main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, choices=FORMATS + ("auto",), help="format of the input file")
    p.add_argument("--input", required=True, help="model-zoo weight file (.pkl / .pth)")
    p.add_argument("--output", required=True, help="where to write our checkpoint (.pth)")
    add_cfg_argument(p, required=False, help="config of the model the weights are for: a YAML file or a packaged "
                                             "config name such as baselines/e2e_mask_rcnn_R-50-FPN_1x")
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
        from ..config import get_cfg

        try:
            cfg = load_cfg_file(args.cfg) if args.cfg is not None else get_cfg()
            if args.opts:
                cfg.merge_from_list(args.opts)
        except ConfigError as e:
            return config_error_exit(e)
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
