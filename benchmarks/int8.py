"""int8 (TEST.QUANTIZE) against fp32 inference speed of one trained model, alternated rounds.

    python benchmarks/int8.py --cfg CFG --ckpt CKPT [--size 480] [--rounds 3] [--calib 4]

Both are our model with the config's inference speed features (``prepare_for_inference``); int8 quantizes the
ResNet stages and FPN convolutions (``maskrcnn.engine.quantize``) after calibrating on ``--calib`` benchmark images
(``common.load_image`` indices 1.., PennFudanPed when present), and both are timed on image 0, ``--size`` short side
(4:3), alternated after one warm-up each. Prints the medians, the spread (min-max) and int8 / fp32.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calib", type=int, default=4)
    args = p.parse_args(argv)
    from maskrcnn.config import get_cfg
    from maskrcnn.engine.speed import prepare_for_inference
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt

    size = (args.size, int(round(args.size * 4 / 3)))
    cfg = get_cfg()
    cfg.merge_from_file(args.cfg)
    cfg.merge_from_list(["TEST.SCALE", size[0], "TEST.MAX_SIZE", size[1]])
    model = Generalized_RCNN(cfg)
    load_ckpt(model, args.ckpt)
    image = common.load_image(size)
    calib = [common.load_image(size, index=i) for i in range(1, args.calib + 1)]
    fp32 = prepare_for_inference(copy.deepcopy(model), cfg)
    int8 = prepare_for_inference(copy.deepcopy(model), cfg, quantize="int8", calib_images=calib)
    info = common.machine_info()
    print(f"# int8 vs fp32 {info['date']} on {info['cpu']} ({info['cores']} cores, {info['threads']} threads, load "
          f"{info['load_avg_1min']}, capability {info['capability']}), {args.cfg}, image {size[0]}x{size[1]} "
          f"({common.image_source()}), commit {common.git_commit()}")
    with torch.no_grad():
        times = common.alternate({"fp32": lambda: fp32([image]), "int8": lambda: int8([image])}, args.rounds)
    for n, ts in times.items():
        print(f"{n}: median {common.median(ts):.3f} s, spread {common.spread(ts)}, rounds {len(ts)}")
    print(f"int8 / fp32: {common.median(times['int8']) / common.median(times['fp32']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
