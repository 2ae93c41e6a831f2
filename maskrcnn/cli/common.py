"""What the command-line tools share: the ``--cfg`` argument, loading the config it names, the ``--nw`` and
``--no_cuda`` overrides, building a dataset checked against the config, and the config-error exit.

Exit statuses of every tool: 0 done, 1 run error (checkpoint, data), 2 bad config, dataset or command line.
"""
from __future__ import annotations

import argparse
import sys

from ..config import CfgNode, ConfigError, get_cfg, resolve_config_path
from ..utils.denormal import NOT_FLUSHED, flush_denormal
from ..utils.malloc import tune_malloc

__all__ = ["CFG_HELP", "add_cfg_argument", "load_cfg_file", "apply_loader_and_device_args", "build_checked_dataset",
           "config_error_exit"]

CFG_HELP = ("config: a YAML file, or the name of a config shipped with the package such as "
            "baselines/e2e_mask_rcnn_R-50-FPN_1x or quick_schedules/e2e_mask_rcnn_R-18-FPN_synthetic_cpu "
            "(.yaml optional)")


def add_cfg_argument(parser: argparse.ArgumentParser, required: bool = True, help: str = CFG_HELP) -> None:
    """``--cfg`` taking a file path or a packaged config name (:func:`maskrcnn.config.resolve_config_path`)."""
    parser.add_argument("--cfg", required=required, default=None, help=help)


def load_cfg_file(name_or_path: str) -> CfgNode:
    """The defaults merged with the config file or packaged config ``name_or_path`` (raises ConfigError)."""
    cfg = get_cfg()
    cfg.merge_from_file(resolve_config_path(name_or_path))
    return cfg


def apply_loader_and_device_args(cfg: CfgNode, args: argparse.Namespace) -> None:
    """``--nw`` (DATA_LOADER.NUM_THREADS, >= 0) and ``--no_cuda`` (MODEL.DEVICE cpu) when given."""
    if args.nw is not None:
        if args.nw < 0:
            raise ConfigError(f"--nw {args.nw}: must be >= 0")
        cfg.DATA_LOADER.NUM_THREADS = args.nw
    if args.no_cuda:
        cfg.MODEL.DEVICE = "cpu"


def build_checked_dataset(cfg: CfgNode, spec, is_train: bool):
    """The dataset ``spec`` names, built with the config's data settings and checked against MODEL.NUM_CLASSES
    (raises DatasetSpecError or ConfigError).

    A training set must hold an object to learn from (one that is not a crowd region): without one every box loss
    is 0 and the run would learn nothing, silently. A test set keeps box-only objects (``box_masks``) whatever the
    model: the evaluation reads the json's own ground truth, so a mask model still gets its box AP there (the mask
    AP ignores those objects)."""
    from ..data.catalog import DatasetSpecError, build_dataset, check_num_classes

    dataset = build_dataset(spec, cfg.DATA_DIR, is_train=is_train,
                            filter_empty=bool(is_train and cfg.TRAIN.FILTER_EMPTY_GT),
                            max_image_side=cfg.DATA_LOADER.MAX_IMAGE_SIDE,
                            box_masks=not (is_train and cfg.MODEL.MASK_ON))
    check_num_classes(cfg, dataset)
    if is_train and getattr(dataset, "num_objects", None) == 0:
        raise DatasetSpecError(f"dataset spec {spec!r}: {dataset!r} has no object to train on (every annotation is "
                               f"missing, dropped or a crowd region, iscrowd 1): give the objects iscrowd 0")
    return dataset


def apply_process_settings(cfg: CfgNode) -> None:
    """The process-wide settings ``train_net`` and ``test_net`` apply right after reading the config, before torch
    starts its thread pool: ``TUNE_MALLOC`` (glibc malloc thresholds) and ``FLUSH_DENORMAL`` (FTZ/DAZ in every CPU
    thread; a warning on stderr when that cannot hold)."""
    if cfg.TUNE_MALLOC:
        tune_malloc()
    if cfg.FLUSH_DENORMAL and not flush_denormal():
        print(f"warning: {NOT_FLUSHED}", file=sys.stderr)


def config_error_exit(error: ConfigError) -> int:
    """Print ``config error: ...`` (no traceback) and return the exit status 2."""
    print(f"config error: {error}", file=sys.stderr)
    return 2
