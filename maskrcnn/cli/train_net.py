"""Train Mask R-CNN (Detectron-style command line): ``maskrcnn-train``, or ``python tools/train_net.py`` in a checkout.

    maskrcnn-train --cfg quick_schedules/e2e_mask_rcnn_R-18-FPN_synthetic_cpu \\
        --dataset synthetic:train --output_dir output/synthetic
    torchrun --nproc_per_node 8 tools/train_net.py --cfg configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml

``--bs`` is the total batch size over all processes (each gets ``bs / processes``). When the total batch per
optimizer step (processes x TRAIN.IMS_PER_BATCH x --iter_size) differs from the config file's
(NUM_GPUS x TRAIN.IMS_PER_BATCH), BASE_LR and the schedule are rescaled (Detectron's linear rule; see
SOLVER.SCALE_WITH_BATCH); ``--lr`` then sets BASE_LR explicitly. ``--resume`` continues from the newest checkpoint
in the output folder (or from ``--load_ckpt``) exactly where it stopped.

Exit status: 0 done, 1 training error (message printed; also a lost process of a multi-process run), 2 bad
config, dataset or command line, 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (continue with --resume;
docs/reliability.md).
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time

from ..config import ConfigError, assert_and_infer_cfg
from ..utils import distributed as dist_utils
from .auto import add_auto_arguments, auto_requested, budget_hook, configure_auto, fit_budget, load_auto_cfg
from .common import (add_cfg_argument, apply_loader_and_device_args, apply_process_settings, build_checked_dataset,
                     config_error_exit, load_cfg_file)

__all__ = ["main", "parse_args", "setup_cfg", "train", "evaluate", "load_imagenet_backbone"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Mask R-CNN.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_cfg_argument(p, required=False, help="config file or packaged name (required unless --auto)")
    add_auto_arguments(p)
    p.add_argument("--dataset", default=None,
                   help="training dataset(s): catalog name or spec (coco:ANN:IMGDIR, pennfudan:ROOT[:split], "
                        "synthetic:train), several joined with commas; default TRAIN.DATASETS")
    p.add_argument("--set", dest="set_cfgs", nargs="+", default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. --set SOLVER.MAX_ITER 100 TRAIN.SCALES [128]")
    p.add_argument("--bs", type=int, default=None, help="total batch size over all processes")
    p.add_argument("--nw", type=int, default=None, help="data loader worker processes (DATA_LOADER.NUM_THREADS)")
    p.add_argument("--iter_size", type=int, default=1, help="batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (after any batch-size rescaling)")
    p.add_argument("--load_ckpt", default=None, help="weights to start from (or, with --resume, the checkpoint)")
    p.add_argument("--load_detectron", default=None,
                   help="model-zoo weights to start from (Detectron .pkl, Detectron.pytorch, torchvision, detectron2; "
                        "the format is detected)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--output_dir", default=None, help="where checkpoints and logs go (OUTPUT_DIR)")
    p.add_argument("--use_tfboard", action="store_true",
                   help="write TensorBoard scalars to OUTPUT_DIR/tb (the values of OUTPUT_DIR/metrics.jsonl)")
    p.add_argument("--seed", type=int, default=None, help="random seed (RNG_SEED)")
    p.add_argument("--no_cuda", action="store_true", help="train on the CPU even when CUDA is available")
    p.add_argument("--skip_nonfinite", action="store_true",
                   help="skip iterations with a NaN/inf loss (counted) instead of stopping")
    p.add_argument("--eval_after", action="store_true", help="evaluate model_final on TEST.DATASETS at the end")
    p.add_argument("--test_dataset", default=None, help="dataset for --eval_after (implies it); default TEST.DATASETS")
    return p.parse_args(argv)


def setup_cfg(args: argparse.Namespace, world_size: int, log=print):
    """The run's config: file, overrides, batch-size rescaling, validation (raises ConfigError)."""
    from ..engine.solver import scale_schedule

    if auto_requested(args):
        cfg = load_auto_cfg(args.cfg)
    elif not args.cfg:
        raise ConfigError("--cfg is required (a config file or packaged name), unless --auto chooses the recipe")
    else:
        cfg = load_cfg_file(args.cfg)
    config_batch = int(cfg.NUM_GPUS) * int(cfg.TRAIN.IMS_PER_BATCH)
    if args.set_cfgs:
        cfg.merge_from_list(args.set_cfgs)
    if args.dataset:
        cfg.TRAIN.DATASETS = [args.dataset]
    if args.test_dataset:
        cfg.TEST.DATASETS = [args.test_dataset]
    if args.bs is not None:
        if args.bs < 1 or args.bs % world_size:
            raise ConfigError(f"--bs {args.bs}: the total batch must be a positive multiple of the number of "
                              f"processes ({world_size})")
        cfg.TRAIN.IMS_PER_BATCH = args.bs // world_size
    if args.iter_size < 1:
        raise ConfigError(f"--iter_size {args.iter_size}: must be >= 1")
    apply_loader_and_device_args(cfg, args)
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.seed is not None:
        cfg.RNG_SEED = args.seed
    if not cfg.TRAIN.DATASETS:
        raise ConfigError(f"{args.cfg}: no training dataset: set TRAIN.DATASETS or pass --dataset")
    total = world_size * int(cfg.TRAIN.IMS_PER_BATCH) * int(args.iter_size)
    if auto_requested(args) or cfg.AUTO.ENABLED:
        configure_auto(cfg, args, log=log, world_size=world_size)  # its learning rate is for the total batch
        total = config_batch = world_size * int(cfg.TRAIN.IMS_PER_BATCH) * int(args.iter_size)
    # Kept on args so that train() repeats the rule in the run's log.
    args.lr_scaling = scale_schedule(cfg, total, config_batch, log=log)
    if args.lr is not None:
        if not args.lr > 0:
            raise ConfigError(f"--lr {args.lr}: must be > 0")
        cfg.SOLVER.BASE_LR = float(args.lr)
    assert_and_infer_cfg(cfg, source=args.cfg)
    return cfg


def train(cfg, args, ctx, logger) -> int:
    from ..data.build import build_train_loader
    from ..data.catalog import check_class_order
    from ..engine.ema import EMAHook, ModelEMA
    from ..engine.evaluation_hook import check_best_metric
    from ..engine.hooks import LogHook, PeriodicCheckpointer
    from ..engine.launch import create_ddp_model
    from ..engine.lost_rank import LostRankWatchdog
    from ..engine.monitoring import build_training_monitors
    from ..engine.preemption import EXIT_PREEMPTED, Preempted, PreemptionHandler, PreemptionHook
    from ..engine.solver import build_lr_scheduler, build_optimizer_from_cfg, describe_solver
    from ..engine.speed import prepare_for_training
    from ..engine.trainer import NonFiniteLossError, Trainer, make_grad_scaler
    from ..modeling.backbone.norms import check_trainable_from_scratch, convert_sync_batchnorm
    from ..modeling.generalized_rcnn import Generalized_RCNN
    from ..utils.checkpoint import Checkpointer, load_ckpt
    from ..utils.env import seed_all

    output_dir = cfg.OUTPUT_DIR
    dataset = build_checked_dataset(cfg, cfg.TRAIN.DATASETS, is_train=True)
    # TEST.EVAL_PERIOD: the test sets are built (and SOLVER.CHECKPOINT_BEST checked) before any model work.
    eval_datasets = ([(spec, build_checked_dataset(cfg, spec, is_train=False)) for spec in cfg.TEST.DATASETS]
                     if cfg.TEST.EVAL_PERIOD > 0 else [])
    for _, eval_dataset in eval_datasets:
        # The training set's names in another order: every evaluation would score the wrong categories.
        check_class_order(getattr(dataset, "classes", None), eval_dataset)
    if cfg.TEST.EVAL_PERIOD > 0 and not eval_datasets:
        raise ConfigError(f"TEST.EVAL_PERIOD = {cfg.TEST.EVAL_PERIOD} needs a test dataset: set TEST.DATASETS or "
                          f"pass --test_dataset")
    best_metric = (check_best_metric(cfg.SOLVER.CHECKPOINT_BEST, eval_datasets, cfg.MODEL.MASK_ON,
                                     cfg.TEST.EVAL_PERIOD) if cfg.SOLVER.CHECKPOINT_BEST else "")
    logger.info("training on %s (%d images), %d process(es) x %d images, iter_size %d, device %s",
                dataset, len(dataset), ctx.world_size, cfg.TRAIN.IMS_PER_BATCH, args.iter_size, ctx.device)

    seed_all(int(cfg.RNG_SEED) + ctx.rank)
    model = Generalized_RCNN(cfg).to(ctx.device)
    prepare_for_training(model, cfg)  # TRAIN.FUSE_FROZEN_BN, TRAIN.CHANNELS_LAST; parameters and keys unchanged
    # RESNETS.NORM SyncBN: SyncBatchNorm across processes (same parameters and keys); plain BN on one process.
    try:
        model = convert_sync_batchnorm(model, cfg.RESNETS.NORM, ctx.world_size, ctx.device.type)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    imagenet = cfg.MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS and not (args.resume or args.load_ckpt or args.load_detectron)
    if imagenet:
        load_imagenet_backbone(model, cfg, logger)
    optimizer = build_optimizer_from_cfg(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    scaler = make_grad_scaler(cfg.TRAIN.AMP, ctx.device)
    ema = ModelEMA(model, cfg.SOLVER.EMA_DECAY) if cfg.SOLVER.EMA_DECAY > 0 else None
    checkpointer = Checkpointer(model, output_dir, optimizer, scheduler, scaler, save_to_disk=ctx.is_main, ema=ema)

    ckpt, start_iter = None, 0
    if args.resume:
        path = args.load_ckpt or checkpointer.find_last()
        if path is None:
            logger.warning("--resume: no checkpoint in %s; starting from iteration 0", output_dir)
        else:
            # Without --load_ckpt, resume() picks the newest checkpoint that passes its checksum and loads, and
            # falls back to older ones (saying so) when the newest is corrupt.
            ckpt = checkpointer.resume(args.load_ckpt)
            start_iter = int(ckpt["iteration"])
    # Without --resume, or with --resume on a fresh output folder (a job script that always passes it): the
    # starting weights a first run would load.
    starting = ckpt is None and not (args.resume and args.load_ckpt) and bool(args.load_ckpt or args.load_detectron)
    if starting:
        weights = args.load_ckpt or args.load_detectron
        report = load_ckpt(model, weights)  # the file's format (ours or a model zoo's) is detected
        logger.info("loaded weights from %s%s", weights,
                    f" (re-initialised: {', '.join(report['skipped'])})" if report["skipped"] else "")
        if ema is not None:
            ema.reset(model)
    if args.resume and ckpt is None and not starting and cfg.MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS:
        load_imagenet_backbone(model, cfg, logger)
        imagenet = True
        if ema is not None:
            ema.reset(model)
    if ckpt is None and not imagenet and not starting:
        check_trainable_from_scratch(model, args.cfg)  # random weights: FrozenBN would diverge (ConfigError)
    total_batch = ctx.world_size * int(cfg.TRAIN.IMS_PER_BATCH) * int(args.iter_size)
    if getattr(args, "lr_scaling", None) and args.lr_scaling.get("message"):
        logger.info("%s", args.lr_scaling["message"])
    logger.info("%s", describe_solver(cfg, optimizer, total_batch))
    if ema is not None:
        logger.info("EMA of the weights: decay %g (SOLVER.EMA_DECAY); model_final.pth holds the EMA weights and they "
                    "are the ones evaluated", ema.decay)

    cfg_yaml = cfg.dump()
    # The class names travel with the weights: Predictor and infer_simple name the labels with them.
    extra = {"classes": [str(c) for c in dataset.classes]} if getattr(dataset, "classes", None) else {}
    if start_iter >= cfg.SOLVER.MAX_ITER:
        logger.info("the checkpoint is at iteration %d >= SOLVER.MAX_ITER = %d: nothing left to train",
                    start_iter, cfg.SOLVER.MAX_ITER)
        # Decided on rank 0 for all: save() is a collective that every rank must enter.
        if ema is not None and ckpt is not None and "ema" in ckpt:
            ema.copy_to(model)  # the final weights of an EMA run are the averaged ones
        if dist_utils.broadcast_object(not os.path.exists(os.path.join(output_dir, "model_final.pth"))):
            checkpointer.save("model_final", iteration=start_iter, cfg_yaml=cfg_yaml, **extra)
        final = os.path.join(output_dir, "model_final.pth")
    else:
        # Before the loader forks its workers: they inherit the handler and outlive the scheduler's signal.
        preemption = PreemptionHandler().install()
        ddp_model = create_ddp_model(model, ctx)
        loader = build_train_loader(
            dataset, ims_per_batch=cfg.TRAIN.IMS_PER_BATCH, num_workers=cfg.DATA_LOADER.NUM_THREADS,
            aspect_grouping=cfg.TRAIN.ASPECT_GROUPING, aspect_group_factor=cfg.TRAIN.ASPECT_RATIO_GROUP_FACTOR,
            seed=cfg.RNG_SEED, rank=ctx.rank, world_size=ctx.world_size,
            start_iter=start_iter * args.iter_size, flip=cfg.TRAIN.USE_FLIPPED, pin_memory=ctx.device.type == "cuda",
            skip_unreadable=cfg.DATA_LOADER.SKIP_UNREADABLE, cache_mb=cfg.DATA_LOADER.CACHE_RAM_MB)
        saver = PeriodicCheckpointer(checkpointer, cfg.TRAIN.SNAPSHOT_ITERS, cfg_yaml, extra=extra)
        # metrics.jsonl (+ TensorBoard), evaluations, model_best.pth, progress bar; the order keeps resume exact.
        mon = build_training_monitors(cfg, model=model, eval_datasets=eval_datasets, device=ctx.device,
                                      is_main=ctx.is_main, start_iter=start_iter, use_tensorboard=args.use_tfboard,
                                      best_metric=best_metric, cfg_yaml=cfg_yaml, extra=extra, logger=logger)
        trainer = Trainer(ddp_model, optimizer, scheduler, loader, max_iter=cfg.SOLVER.MAX_ITER, start_iter=start_iter,
                          iter_size=args.iter_size, amp=cfg.TRAIN.AMP, device=ctx.device,
                          clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM, skip_nonfinite=args.skip_nonfinite, scaler=scaler,
                          hooks=[LogHook(cfg.TRAIN.LOG_PERIOD, logger, metrics_writer=mon.metrics),
                                 # before evaluation and saving: both see the EMA weights of this iteration
                                 EMAHook(ema) if ema is not None else None,
                                 mon.eval_hook, saver, mon.progress,
                                 PreemptionHook(preemption, checkpointer, cfg_yaml, extra=extra),
                                 budget_hook(cfg, args, ctx, logger)])
        if ckpt is not None:
            # Last: everything above may draw random numbers (model init, DDP); the resumed stream starts here.
            Checkpointer.restore_rng(ckpt, ctx.rank, ctx.world_size)
        logger.info("training iterations %d..%d", start_iter, cfg.SOLVER.MAX_ITER - 1)
        watchdog = LostRankWatchdog.from_cfg(cfg, ctx.rank, ctx.world_size).start()
        try:
            trainer.train()
        except NonFiniteLossError as e:
            last = checkpointer.find_last()
            logger.error("%s\nLast good checkpoint: %s", e, last or "none written yet")
            return 1
        except Preempted as e:
            logger.warning("%s; exit status %d", e, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        except (RuntimeError, OSError) as e:
            watchdog.raise_if_lost(e)  # a failed collective: name the process that is gone, if one is
            raise
        finally:
            watchdog.stop()
            preemption.uninstall()
            loader.close()
        if trainer.skipped_steps:
            logger.warning("%d iteration(s) were skipped for non-finite losses", trainer.skipped_steps)
        final = saver.final_path or os.path.join(output_dir, "model_final.pth")
        logger.info("training done: %s", final)

    if args.eval_after or args.test_dataset:
        return evaluate(cfg, model, ctx, final, logger)
    return 0


def evaluate(cfg, model, ctx, final_path: str, logger) -> int:
    from ..data.catalog import check_class_order
    from ..engine.inference import evaluate_on_dataset
    from ..engine.speed import prepare_for_inference
    from ..modeling.backbone.norms import revert_sync_batchnorm
    from ..predictor import _checkpoint_metadata

    # A copy: the inference speed features (folded BN, fused convolutions) make a model unfit for training.
    # SyncBatchNorm (RESNETS.NORM SyncBN under DDP) goes back to BatchNorm: eval-mode BN, folded like any other.
    model = prepare_for_inference(revert_sync_batchnorm(copy.deepcopy(model)), cfg)
    if not cfg.TEST.DATASETS:
        raise ConfigError("--eval_after: no test dataset: set TEST.DATASETS or pass --test_dataset")
    datasets = [(spec, build_checked_dataset(cfg, spec, is_train=False)) for spec in cfg.TEST.DATASETS]
    trained = _checkpoint_metadata(final_path).get("classes")
    for _, dataset in datasets:
        check_class_order(trained, dataset)
    for spec, dataset in datasets:
        out = os.path.join(cfg.OUTPUT_DIR, "test" if len(cfg.TEST.DATASETS) == 1 else f"test_{_slug(spec)}")
        logger.info("evaluating %s on %s (%d images)", final_path, dataset, len(dataset))
        evaluate_on_dataset(model, dataset, cfg, device=ctx.device, output_dir=out,
                            num_workers=cfg.DATA_LOADER.NUM_THREADS, log=logger.info)
    return 0


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-80:]


def load_imagenet_backbone(model, cfg, logger) -> None:
    """RESNETS.IMAGENET_PRETRAINED_WEIGHTS (Caffe2 .pkl or torchvision .pth; a relative path is also looked up
    under DATA_DIR) into the backbone; any mismatch is an error listing the names."""
    from ..utils.checkpoint import CheckpointError
    from ..utils.weights.formats import WeightsConversionError
    from ..utils.weights.imagenet import load_imagenet_pretrained_weights
    path = cfg.RESNETS.IMAGENET_PRETRAINED_WEIGHTS
    candidates = [path] + ([os.path.join(cfg.DATA_DIR, path)] if not os.path.isabs(path) else [])
    found = next((c for c in candidates if c and os.path.isfile(c)), None)
    if found is None:
        raise CheckpointError(f"MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS is True but RESNETS.IMAGENET_PRETRAINED_WEIGHTS "
                              f"= {path!r} is not a file (looked at: {', '.join(map(repr, candidates))})")
    try:
        notes = load_imagenet_pretrained_weights(model, found, cfg)
    except WeightsConversionError as e:
        raise CheckpointError(str(e)) from e
    for note in notes:
        logger.info("ImageNet weights %s: %s", found, note)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.started = time.time()  # --auto's time budget counts from here
    try:
        cfg = setup_cfg(args, dist_utils.env_world_size(), log=lambda m: print(m, flush=True))
    except ConfigError as e:
        return config_error_exit(e)
    apply_process_settings(cfg)  # before --auto times its steps, so that they run as training will

    from ..data.build import DatasetItemError, WorkerDiedError
    from ..data.validate import UnreadableImagesError
    from ..data.catalog import DatasetSpecError
    from ..engine.hooks import TensorboardUnavailable
    from ..engine.launch import run_then_shutdown, setup_distributed
    from ..engine.lost_rank import LostRankError
    from ..ops._backend import set_backend
    from ..utils.checkpoint import CheckpointError
    from ..utils.env import collect_env_info
    from ..utils.logger import setup_logger

    ctx = setup_distributed(cfg.MODEL.DEVICE, no_cuda=args.no_cuda)
    # A file-size limit (ulimit -f) then makes a too-large write fail with EFBIG, reported like a full disk, instead
    # of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def body() -> int:
        logger = setup_logger("maskrcnn", cfg.OUTPUT_DIR, rank=ctx.rank)
        logger.info("command line: %s", " ".join(sys.argv))
        logger.info("environment:\n%s", collect_env_info())
        if cfg.AUTO.ENABLED:
            fit_budget(cfg, args, ctx, logger)  # times a few steps: SOLVER.MAX_ITER for AUTO.BUDGET_MINUTES
        if ctx.is_main:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(cfg.dump())
        if cfg.OPS_BACKEND != "auto":
            set_backend(cfg.OPS_BACKEND)
        return train(cfg, args, ctx, logger)

    return run_then_shutdown(body, usage_errors=(ConfigError, DatasetSpecError),
                             run_errors=(CheckpointError, TensorboardUnavailable, DatasetItemError,
                                         UnreadableImagesError, WorkerDiedError, LostRankError))
