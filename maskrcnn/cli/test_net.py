"""Evaluate a Mask R-CNN checkpoint with COCO metrics (Detectron-style command line): ``maskrcnn-test``, or
``python tools/test_net.py`` in a checkout.

    maskrcnn-test --cfg quick_schedules/e2e_mask_rcnn_R-18-FPN_synthetic_cpu \\
        --load_ckpt output/synthetic/model_final.pth --dataset synthetic:val
    torchrun --nproc_per_node 8 tools/test_net.py --cfg ... --load_ckpt ...     # images split, results gathered

Writes to the output folder (default: ``test/`` next to the checkpoint): ``bbox_results.json`` and
``segm_results.json`` (COCO results; masks as RLE), ``metrics.json`` (AP, AP50, AP75, APs, APm, APl in percent per
type), the per-image partial results that ``--resume`` continues from after an interruption, and with ``--vis`` one
picture per image under ``vis/``.

Exit status: 0 done, 1 checkpoint error (message printed), 2 bad config, dataset or command line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from ..config import ConfigError, assert_and_infer_cfg
from .common import (add_cfg_argument, apply_loader_and_device_args, apply_process_settings, build_checked_dataset,
                     config_error_exit, load_cfg_file)

__all__ = ["main", "parse_args", "setup_cfg", "run", "fingerprint", "make_visualizer"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a Mask R-CNN checkpoint.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_cfg_argument(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load_ckpt", help="checkpoint to evaluate")
    src.add_argument("--load_detectron", dest="load_ckpt",
                     help="model-zoo weights to evaluate (Detectron .pkl, Detectron.pytorch, torchvision, detectron2; "
                          "the format is detected)")
    p.add_argument("--dataset", default=None, help="dataset spec or catalog name; default TEST.DATASETS")
    p.add_argument("--output_dir", default=None, help="where results go (default: <checkpoint folder>/test)")
    p.add_argument("--set", dest="set_cfgs", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--vis", action="store_true", help="write a picture of the detections of every image")
    p.add_argument("--range", nargs=2, type=int, default=None, metavar=("A", "B"),
                   help="evaluate dataset images A..B-1 only")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the partial results in the output folder")
    p.add_argument("--nw", type=int, default=None, help="data loader worker processes (DATA_LOADER.NUM_THREADS)")
    p.add_argument("--no_cuda", action="store_true", help="run on the CPU even when CUDA is available")
    return p.parse_args(argv)


def setup_cfg(args: argparse.Namespace):
    cfg = load_cfg_file(args.cfg)
    if args.set_cfgs:
        cfg.merge_from_list(args.set_cfgs)
    if args.dataset:
        cfg.TEST.DATASETS = [args.dataset]
    apply_loader_and_device_args(cfg, args)
    if not cfg.TEST.DATASETS:
        raise ConfigError(f"{args.cfg}: no test dataset: set TEST.DATASETS or pass --dataset")
    if args.range is not None and not 0 <= args.range[0] < args.range[1]:
        raise ConfigError(f"--range {args.range[0]} {args.range[1]}: need 0 <= A < B")
    assert_and_infer_cfg(cfg, source=args.cfg)
    return cfg


def fingerprint(ckpt_path: str, cfg, dataset) -> str:
    """What the partial results depend on: the checkpoint file, the config and the dataset."""
    st = os.stat(ckpt_path)
    text = json.dumps([os.path.abspath(ckpt_path), st.st_size, st.st_mtime_ns, cfg.dump(), repr(dataset),
                       len(dataset)])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def make_visualizer(dataset, out_dir: str, thresh: float):
    import cv2
    import numpy as np

    from ..utils.vis import draw_instances

    os.makedirs(out_dir, exist_ok=True)

    def on_image(index, image, record):
        rgb = (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        drawn = draw_instances(rgb, np.asarray(record["boxes"]).reshape(-1, 4), record["scores"], record["labels"],
                               record.get("segms"), class_names=dataset, thresh=thresh)
        path = os.path.join(out_dir, f"{record['image_id']}.png")
        if not cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
            raise OSError(f"--vis: could not write {path}")

    return on_image


def run(cfg, args, ctx, logger) -> int:
    from ..engine.inference import RangeDataset, evaluate_on_dataset
    from ..engine.speed import prepare_for_inference
    from ..modeling.generalized_rcnn import Generalized_RCNN
    from ..utils.checkpoint import load_ckpt

    # Every dataset is built and checked (class count, --range) before any model work.
    datasets = []
    for spec in cfg.TEST.DATASETS:
        dataset = build_checked_dataset(cfg, spec, is_train=False)
        if args.range is not None:
            if args.range[0] >= len(dataset):
                raise ConfigError(f"--range {args.range[0]} {args.range[1]}: {spec} has only {len(dataset)} images")
            dataset = RangeDataset(dataset, args.range[0], args.range[1])
        datasets.append((spec, dataset))
    # The checkpoint's class names (its "classes", a memory-mapped read) against each dataset's, before any
    # model work: the same names in another order would score every detection against the wrong category.
    from ..data.catalog import check_class_order
    from ..predictor import _checkpoint_metadata

    trained = _checkpoint_metadata(args.load_ckpt).get("classes")
    for _, dataset in datasets:
        check_class_order(trained, dataset)
    model = Generalized_RCNN(cfg).to(ctx.device)
    load_ckpt(model, args.load_ckpt, allow_class_mismatch=False)
    calib = None
    if cfg.TEST.QUANTIZE:
        # int8 ranges from the user's own images: the first TEST.QUANTIZE_CALIB_IMAGES of the first dataset.
        from ..engine.quantize import calibration_images

        calib = [im.to(ctx.device) for im in calibration_images(datasets[0][1], cfg.TEST.QUANTIZE_CALIB_IMAGES)]
        logger.info("TEST.QUANTIZE %s: calibrating on the first %d images of %s", cfg.TEST.QUANTIZE, len(calib),
                    datasets[0][0])
    # TEST.FUSE_FROZEN_BN, FUSE_CONV_ACTIVATIONS, CHANNELS_LAST, AMP, COMPILE, QUANTIZE
    prepare_for_inference(model, cfg, calib_images=calib)
    base_out = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.load_ckpt)), "test")
    several = len(datasets) > 1
    for spec, dataset in datasets:
        out = os.path.join(base_out, "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)) if several \
            else base_out
        on_image = make_visualizer(dataset, os.path.join(out, "vis"), cfg.VIS_TH) if args.vis else None
        logger.info("evaluating %s on %s (%d images) -> %s", args.load_ckpt, dataset, len(dataset), out)
        metrics = evaluate_on_dataset(model, dataset, cfg, device=ctx.device, output_dir=out,
                                      num_workers=cfg.DATA_LOADER.NUM_THREADS, resume=args.resume,
                                      fingerprint=fingerprint(args.load_ckpt, cfg, dataset), on_image=on_image,
                                      log=logger.info)
        if metrics is not None:
            summary = ", ".join(f"{t} AP {m['AP']:.2f}" for t, m in metrics.items())
            logger.info("%s: %s", spec, summary)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = setup_cfg(args)
    except ConfigError as e:
        return config_error_exit(e)
    apply_process_settings(cfg)

    from ..data.build import DatasetItemError
    from ..data.catalog import DatasetSpecError
    from ..engine.launch import run_then_shutdown, setup_distributed
    from ..ops._backend import set_backend
    from ..utils.checkpoint import CheckpointError
    from ..utils.logger import setup_logger

    if not os.path.isfile(args.load_ckpt):
        print(f"error: checkpoint not found: {args.load_ckpt}", file=sys.stderr)
        return 1
    ctx = setup_distributed(cfg.MODEL.DEVICE, no_cuda=args.no_cuda)

    def body() -> int:
        out = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.load_ckpt)), "test")
        logger = setup_logger("maskrcnn", out, rank=ctx.rank)
        logger.info("command line: %s", " ".join(sys.argv))
        if cfg.OPS_BACKEND != "auto":
            set_backend(cfg.OPS_BACKEND)
        return run(cfg, args, ctx, logger)

    return run_then_shutdown(body, usage_errors=(ConfigError, DatasetSpecError),
                             run_errors=(CheckpointError, DatasetItemError))
