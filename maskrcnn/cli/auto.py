"""``train_net --auto [--budget 10min]``: the command-line side of :mod:`maskrcnn.engine.auto_recipe`.

* :func:`add_auto_arguments` adds ``--auto`` and ``--budget``;
* :func:`load_auto_cfg` is the config ``--auto`` starts from: the packaged ``scratch/auto_cpu`` recipe, with the
  ``--cfg`` file (optional) merged over it;
* :func:`configure_auto` reads the training set's statistics and applies the data-dependent choices (before
  validation); keys of the ``--cfg`` file, of ``--set`` and of ``--bs``/``--lr``/``--budget``/``--test_dataset``
  are explicit and win;
* :func:`fit_budget` (once the device is known) times a few steps and sizes the schedule to the budget;
* :func:`budget_hook` keeps the run at its deadline while it trains (:mod:`maskrcnn.engine.budget`).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, List, Optional

from ..config import CfgNode, ConfigError, get_cfg, resolve_config_path

__all__ = ["add_auto_arguments", "auto_requested", "load_auto_cfg", "configure_auto", "fit_budget", "budget_hook"]


def add_auto_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auto", action="store_true",
                        help="choose input scale, anchors, sampling sizes, batch and schedule from the training set's "
                             "statistics (AUTO.*; explicit keys win; --cfg optional)")
    parser.add_argument("--budget", default=None,
                        help="with --auto: training time to fill, e.g. 10min, 600s, 1.5h (AUTO.BUDGET_MINUTES)")


def auto_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "auto", False))


def load_auto_cfg(cfg_file) -> CfgNode:
    """Defaults, then the ``--auto`` base recipe, then ``cfg_file`` when given."""
    from ..engine.auto_recipe import AUTO_BASE_CONFIG

    cfg = get_cfg()
    cfg.merge_from_file(resolve_config_path(AUTO_BASE_CONFIG))
    if cfg_file:
        cfg.merge_from_file(resolve_config_path(cfg_file))
    return cfg


def configure_auto(cfg: CfgNode, args: argparse.Namespace, log: Callable[[str], Any] = print,
                   world_size: Optional[int] = None) -> List[str]:
    """Apply the data-dependent choices to the unfrozen ``cfg``; returns the printed lines (also kept on
    ``args.auto_lines``, with the explicit keys on ``args.auto_explicit``). ``world_size`` (default: torchrun's
    ``WORLD_SIZE``) and ``args.iter_size`` make the total batch the learning rate is chosen for."""
    from ..data.catalog import build_dataset
    from ..data.stats import compute_dataset_stats
    from ..engine.auto_recipe import apply_choices, choose_recipe, explicit_keys, parse_budget

    flags = {"TRAIN.DATASETS"}
    if args.bs is not None:
        flags.add("TRAIN.IMS_PER_BATCH")
    if args.lr is not None:
        flags.add("SOLVER.BASE_LR")
    if args.test_dataset:
        flags.add("TEST.DATASETS")
    if args.budget is not None:
        cfg.AUTO.BUDGET_MINUTES = parse_budget(args.budget)
        flags.add("AUTO.BUDGET_MINUTES")
    cfg.AUTO.ENABLED = True
    explicit = explicit_keys(args.cfg, args.set_cfgs, flags)
    lines: List[str] = []

    def say(line: str) -> None:
        lines.append(line)
        log(line)

    if not cfg.TRAIN.DATASETS:
        raise ConfigError("--auto: no training dataset: pass --dataset (or set TRAIN.DATASETS)")
    start = time.time()
    # A set whose objects all lack a segmentation (most detection sets) trains a box-only model, unless the user
    # chose MODEL.MASK_ON: read with box_masks first, to see.
    choose_masks = bool(cfg.MODEL.MASK_ON) and "MODEL.MASK_ON" not in explicit

    def build(box_masks: bool):
        # A ValueError (a DatasetSpecError, or a set without a non-crowd object; the statistics below too) names
        # the dataset: a config error of the run (exit 2), not a crash.
        try:
            return build_dataset(cfg.TRAIN.DATASETS, cfg.DATA_DIR, is_train=True,
                                 filter_empty=bool(cfg.TRAIN.FILTER_EMPTY_GT),
                                 max_image_side=cfg.DATA_LOADER.MAX_IMAGE_SIDE, box_masks=box_masks)
        except ValueError as e:
            raise ConfigError(f"--auto: {e}") from e

    dataset = build(choose_masks or not cfg.MODEL.MASK_ON)
    boxed, objects = getattr(dataset, "box_masked", None), getattr(dataset, "num_objects", None)
    if choose_masks and boxed and objects is not None:
        if boxed >= objects:
            cfg.MODEL.MASK_ON = False
            say(f"auto: MODEL.MASK_ON = False  (none of the {objects} objects of the training set has a "
                f"segmentation: a box-only model, Faster R-CNN)")
        else:  # some objects have masks: a mask model, which drops the others (with a warning)
            say(f"auto: MODEL.MASK_ON = True  ({objects - boxed} of the {objects} objects have a segmentation; the "
                f"{boxed} without one are dropped)")
            dataset = build(False)
    try:
        stats = compute_dataset_stats(dataset, int(cfg.AUTO.STATS_MAX_IMAGES) or None)
    except ValueError as e:
        raise ConfigError(f"--auto: {e}: --auto chooses the anchors and image sizes from the objects' boxes, so the "
                          f"training set needs objects that are not crowd regions (iscrowd 0)") from e
    say(f"auto: training set {dataset!r}, statistics in {time.time() - start:.1f} s:")
    for line in stats.describe():
        say(f"auto:   {line}")
    if world_size is None:
        from ..utils import distributed as dist_utils
        world_size = dist_utils.env_world_size()
    apply_choices(cfg, choose_recipe(cfg, stats, list(cfg.TRAIN.DATASETS), explicit, world_size=world_size,
                                     iter_size=int(getattr(args, "iter_size", 1) or 1)), explicit, say)
    hint = _process_hint(cfg, world_size, bool(getattr(args, "no_cuda", False)))
    if hint:
        say(hint)
    args.auto_lines, args.auto_explicit = lines, explicit
    return lines


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _process_hint(cfg: CfgNode, world_size: int, no_cuda: bool) -> str:
    """A line for a single-process CPU run on a multi-core machine: the auto recipe's small model trains faster
    as one process per core (docs/auto.md, seventh round: in 10 minutes `mixed` made 2585 steps of 4 images on
    one process of 2 threads, 2507 steps of 2 x 4 images on 2 processes of 1 thread)."""
    import torch

    cores = _cpu_cores()
    on_cpu = no_cuda or str(cfg.MODEL.DEVICE) == "cpu" or not torch.cuda.is_available()
    if world_size > 1 or cores < 2 or not on_cpu:
        return ""
    procs = min(cores, 4)
    return (f"auto: note: one process on {cores} CPU cores; this small model's convolutions split poorly across "
            f"threads, and one process per core steps through more images (docs/auto.md): "
            f"OMP_NUM_THREADS={max(cores // procs, 1)} torchrun --standalone --nproc_per_node {procs} "
            f"tools/train_net.py --auto ...")


def fit_budget(cfg: CfgNode, args: argparse.Namespace, ctx, logger) -> None:
    """Size the schedule to ``AUTO.BUDGET_MINUTES`` (see :func:`maskrcnn.engine.auto_recipe.fit_schedule_to_budget`)
    and write every ``--auto`` line to ``OUTPUT_DIR/auto.txt``. ``cfg`` may be frozen; it is frozen again."""
    from ..utils import distributed as dist_utils
    from ..data.catalog import build_dataset
    from ..engine.auto_recipe import fit_schedule_to_budget

    lines = list(getattr(args, "auto_lines", []))

    def say(line: str) -> None:
        lines.append(line)
        logger.info(line)

    frozen = cfg.is_frozen()
    cfg.defrost()
    saved = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if getattr(args, "resume", False) and os.path.isfile(saved):
        # A resumed run keeps the schedule its first start measured (a new timing would move the lr steps).
        from ..config import load_yaml_with_base
        first = load_yaml_with_base(saved)
        # TRAIN.AMP too: the precision the first start timed and chose (bf16 or fp32) stays for the whole run.
        for section, key in (("SOLVER", "MAX_ITER"), ("SOLVER", "STEPS"), ("SOLVER", "WARM_UP_ITERS"),
                             ("TRAIN", "SNAPSHOT_ITERS"), ("TRAIN", "AMP")):
            if f"{section}.{key}" not in getattr(args, "auto_explicit", set()):
                cfg[section][key] = first[section][key]
        say(f"auto: --resume: the schedule of {saved} is kept (SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}, TRAIN.AMP "
            f"{cfg.TRAIN.AMP!r})")
        if frozen:
            cfg.freeze()
        return
    dataset = build_dataset(cfg.TRAIN.DATASETS, cfg.DATA_DIR, is_train=True,
                            filter_empty=bool(cfg.TRAIN.FILTER_EMPTY_GT), max_image_side=cfg.DATA_LOADER.MAX_IMAGE_SIDE,
                            box_masks=not cfg.MODEL.MASK_ON)
    fit_schedule_to_budget(cfg, dataset, ctx.device, getattr(args, "auto_explicit", set()),
                           getattr(args, "started", time.time()), say, dist_utils.broadcast_object,
                           world_size=ctx.world_size)
    if frozen:
        cfg.freeze()
    if ctx.is_main:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "auto.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def budget_hook(cfg: CfgNode, args: argparse.Namespace, ctx, logger):
    """The :class:`~maskrcnn.engine.budget.BudgetHook` of an ``--auto`` run with a budget, or None (no budget, an
    explicit ``SOLVER.MAX_ITER``, or ``--resume``: a resumed run keeps the schedule it had)."""
    from ..utils import distributed as dist_utils
    from ..engine.budget import BudgetHook

    budget_s = float(cfg.AUTO.BUDGET_MINUTES) * 60.0
    if not cfg.AUTO.ENABLED or budget_s <= 0 or getattr(args, "resume", False) or \
            "SOLVER.MAX_ITER" in getattr(args, "auto_explicit", set()):
        return None
    auto_txt = os.path.join(cfg.OUTPUT_DIR, "auto.txt")

    def log(line: str) -> None:
        logger.info(line)
        if ctx.is_main:
            with open(auto_txt, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def on_change(max_iter: int, steps) -> str:
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = int(max_iter), [int(s) for s in steps]
        if frozen:
            cfg.freeze()
        text = cfg.dump()
        if ctx.is_main:
            with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(text)
        return text

    return BudgetHook(getattr(args, "started", time.time()) + budget_s, on_change=on_change, log=log,
                      broadcast=dist_utils.broadcast_object)
