"""``train_net --auto``: choose the recipe from the training set's statistics, as a careful user would.

Before the first iteration, :func:`choose_recipe` reads :class:`~maskrcnn.data.stats.DatasetStats` and proposes a
value and a reason for each data-dependent key:

* ``MODEL.NUM_CLASSES``: the dataset's classes plus the background;
* input scale (``TRAIN.SCALES``, ``TRAIN.MAX_SIZE``, ``TEST.SCALE``, ``TEST.MAX_SIZE``): the smallest shorter side
  at which the 10th-percentile object reaches ``AUTO.MIN_OBJECT_SIZE`` pixels (half of it when object sizes spread
  :data:`WIDE_SIZE_SPREAD` times or more from the 10th to the 90th percentile), within ``AUTO.MIN_INPUT_SIZE``,
  ``AUTO.MAX_INPUT_SIZE`` and ``AUTO.MAX_UPSCALE`` (the step's cost grows with the pixels, so no larger);
* anchors (``FPN.RPN_ANCHOR_START_SIZE``, ``FPN.RPN_ASPECT_RATIOS``): fitted to the boxes as the network sees them
  (:func:`maskrcnn.modeling.rpn.anchor_fit.fit_fpn_anchors`), the recall of the config's anchors and of the fitted
  ones printed;
* RPN and RoI sampling (``TRAIN.RPN_BATCH_SIZE_PER_IM``, ``TRAIN.BATCH_SIZE_PER_IM``, proposal counts,
  ``TEST.DETECTIONS_PER_IM``): from the objects per image;
* ``TEST.MASK_PASTE_METHOD``: detectron2's float-box paste;
* test-time augmentation (``TEST.BBOX_AUG.*``, ``TEST.MASK_AUG.*``): one more run at ``AUTO.TEST_AUG_SCALE`` times
  the test scale (:func:`add_test_aug_choices`);
* batch and learning rate (``TRAIN.IMS_PER_BATCH``, ``SOLVER.BASE_LR``): from the input size;
* ``TRAIN.ASPECT_RATIO_GROUP_FACTOR``: torchvision's finer aspect groups when the batches, simulated on the
  statistics (:func:`batch_padding`), would hold 5% fewer pixels;
* norms (``RESNETS.NORM``, ``FPN.USE_GN``, ``TEST.FUSE_FROZEN_BN``): GroupNorm for batches of 1-2 images, else
  BatchNorm (:func:`add_norm_choices`);
* ``TEST.DATASETS``: the validation split of a synthetic, Penn-Fudan or ``*_train`` catalog training set.

:func:`apply_choices` writes them into the config except where a key is *explicit* (set by the ``--cfg`` file or
``--set``, or a command-line flag such as ``--bs``/``--lr``): an explicit key always wins, and the log says what
was kept. Then, once the device is known, :func:`fit_schedule_to_budget` times a few real training steps of the chosen
model, in fp32 and under bf16 autocast with their steps alternated (``TRAIN.AMP``: the faster by
:data:`BF16_MIN_SPEEDUP`), and sizes ``SOLVER.MAX_ITER`` (with its steps, warm-up and snapshots) to
``AUTO.BUDGET_MINUTES``.

Every choice is printed as ``auto: KEY = VALUE  (reason)`` and ends up in ``OUTPUT_DIR/config.yaml``, so
``test_net --cfg OUTPUT_DIR/config.yaml`` evaluates the same model.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..config import ConfigError, load_yaml_with_base, resolve_config_path
from ..config.names import parse_conv_body_name
from ..data.samplers import aspect_group_of
from ..data.stats import DatasetStats
from ..modeling.rpn.anchor_fit import anchor_quality, fit_fpn_anchors

__all__ = ["AutoChoice", "AUTO_BASE_CONFIG", "explicit_keys", "parse_budget", "choose_recipe", "apply_choices",
           "fit_schedule_to_budget", "schedule_for", "network_boxes", "add_norm_choices", "GN_MAX_BATCH",
           "WIDE_SIZE_SPREAD", "batch_padding", "FINE_ASPECT_FACTOR", "BF16_MIN_SPEEDUP",
           "add_test_aug_choices"]

#: Packaged config ``--auto`` starts from (under a given ``--cfg``).
AUTO_BASE_CONFIG = "scratch/auto_cpu"


@dataclass
class AutoChoice:
    """One key ``--auto`` chose: ``value`` and why; ``kept`` is the explicit value used instead, if any."""

    key: str
    value: Any
    reason: str
    explicit: bool = False
    kept: Any = None

    def line(self) -> str:
        if self.explicit:
            return f"auto: {self.key} = {self.kept!r} kept (explicit); auto would choose {self.value!r}: {self.reason}"
        return f"auto: {self.key} = {self.value!r}  ({self.reason})"


# --- explicit keys ---------------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> Set[str]:
    out: Set[str] = set()
    for k, v in d.items():
        if k == "_BASE_":
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, key + ".")
        else:
            out.add(key)
    return out


def explicit_keys(cfg_file: Optional[str], opts: Sequence[Any] = (), extra: Iterable[str] = ()) -> Set[str]:
    """Dotted keys the user set: those of ``cfg_file`` (with its ``_BASE_`` files), the keys of ``opts`` (the
    ``--set KEY VALUE ...`` list) and ``extra`` (keys that command-line flags set)."""
    keys: Set[str] = set(extra)
    if cfg_file:
        keys |= _flatten(load_yaml_with_base(resolve_config_path(cfg_file)))
    keys |= {str(opts[i]) for i in range(0, len(opts) - 1, 2)}
    return keys


def parse_budget(text: str) -> float:
    """Minutes of a budget such as ``10min``, ``90s``, ``1.5h``, ``10m`` or ``10`` (minutes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(h|hours?|m|min|mins|minutes?|s|sec|secs|seconds?)?\s*",
                     str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--budget {text!r}: expected a duration such as 10min, 600s, 1.5h or a number of minutes")
    value, unit = float(m.group(1)), (m.group(2) or "min").lower()
    return value * 60.0 if unit.startswith("h") else value / 60.0 if unit.startswith("s") else value


# --- choices ---------------------------------------------------------------------------------------------------------
def _round_to(x: float, step: int) -> int:
    return int(max(step, step * round(float(x) / step)))


def _pow2_at_least(x: float) -> int:
    return int(2 ** math.ceil(math.log2(max(float(x), 1.0))))


def _scale_factors(stats: DatasetStats, min_size: int, max_size: int) -> np.ndarray:
    """``(I,)`` resize factor of each image read (the model's shorter-side rule)."""
    short, long_ = stats.image_hw.min(1), stats.image_hw.max(1)
    return np.minimum(min_size / short, max_size / long_)


def network_boxes(stats: DatasetStats, min_size: int, max_size: int):
    """``(boxes (N, 4), padded image sizes (N, 2))`` in network-input pixels at the given resize."""
    f = _scale_factors(stats, min_size, max_size)
    boxes = stats.boxes * f[stats.box_image][:, None]
    hw = np.ceil(stats.image_hw * f[:, None] / 32.0) * 32.0
    return boxes, hw[stats.box_image]


#: Spread of object sizes (90th / 10th percentile of sqrt(area) relative to the image) from which the 10th-percentile
#: object is only brought to half of ``AUTO.MIN_OBJECT_SIZE``.
WIDE_SIZE_SPREAD = 8.0


def _input_size(cfg, stats: DatasetStats):
    a = cfg.AUTO
    short = stats.image_hw.min(1)
    med_short = float(np.median(short))
    rel = stats.relative_box_sizes()
    p10 = float(np.percentile(rel, 10))
    spread = float(np.percentile(rel, 90)) / max(p10, 1e-6)
    # Objects from a few pixels to most of the image: enlarging every image for the smallest tenth costs all the
    # steps (on synthetic:span, 352 px input and 2 images per step: 5.5 box AP in 5 minutes; 176 px and 4 images:
    # 27.4); the target for them is halved.
    wide = spread >= WIDE_SIZE_SPREAD
    min_object = float(a.MIN_OBJECT_SIZE) / (2.0 if wide else 1.0)
    target = (f"AUTO.MIN_OBJECT_SIZE={a.MIN_OBJECT_SIZE} px" if not wide else
              f"{min_object:.0f} px (half of AUTO.MIN_OBJECT_SIZE={a.MIN_OBJECT_SIZE}: object sizes spread "
              f"{spread:.0f}x from the 10th to the 90th percentile, >= {WIDE_SIZE_SPREAD:.0f}x)")
    need = min_object / max(p10, 1e-6)
    hi = min(float(a.MAX_INPUT_SIZE), med_short * float(a.MAX_UPSCALE))
    lo = min(float(a.MIN_INPUT_SIZE), hi)
    size = _round_to(min(max(need, lo), hi), 16)
    aspect = float(np.percentile(stats.image_hw.max(1) / short, 95))
    max_size = max(size, _round_to(size * aspect, 16))
    if need > hi:
        why = (f"10% of objects are under {p10 * med_short:.0f} px in images of median shorter side {med_short:.0f}: "
               f"{need:.0f} px would bring them to {target}, capped by "
               f"AUTO.MAX_INPUT_SIZE={a.MAX_INPUT_SIZE} / AUTO.MAX_UPSCALE={a.MAX_UPSCALE}")
    elif need < lo:
        why = (f"objects are large (10% under {p10:.2f} of the shorter side): even {need:.0f} px keeps them >= "
               f"{min_object:.0f} px; AUTO.MIN_INPUT_SIZE={a.MIN_INPUT_SIZE} sets the floor (fewer pixels, faster "
               f"steps)")
    else:
        why = (f"the smallest shorter side at which the 10th-percentile object ({p10:.3f} of the shorter side) "
               f"reaches {target}")
    return size, max_size, f"{why}; longer side up to {aspect:.2f}x (95th percentile image aspect)", med_short


def _available_ram_mb() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (AttributeError, ValueError, OSError):  # not POSIX: assume a small machine
        return 4096.0


def _cache_choice(cfg, stats: DatasetStats):
    """``(CACHE_RAM_MB, reason)``: keep the decoded set in memory when it is small. Sized for float pixels (12
    bytes; images that are exactly k/255 take 3) and uint8 masks."""
    pixels = float(np.mean(stats.image_hw[:, 0] * stats.image_hw[:, 1]))
    per_image = pixels * (12 + float(np.mean(stats.objects_per_image)) + 1)  # image, masks, crowd/slack
    need = per_image * stats.num_images / 2 ** 20
    room = min(4096.0, 0.25 * _available_ram_mb())
    if int(cfg.DATA_LOADER.NUM_THREADS) != 0:
        return 0, (f"DATA_LOADER.NUM_THREADS = {cfg.DATA_LOADER.NUM_THREADS}: each worker would keep its own copy "
                   f"of the {need:.0f} MiB set")
    if need > room:
        return 0, (f"the decoded set (about {need:.0f} MiB) is larger than {room:.0f} MiB (a quarter of free memory, "
                   f"at most 4 GiB)")
    mb = int(math.ceil(1.25 * need / 16.0) * 16)
    return mb, (f"{stats.num_images} images of about {pixels ** 0.5:.0f}^2 px: about {need:.0f} MiB decoded, so each "
                f"image is decoded once instead of every epoch")


def _test_datasets(specs: Sequence[str]) -> Optional[List[str]]:
    out = []
    for spec in specs:
        fields = spec.split(":")
        if fields[0] == "synthetic" and fields[-1] == "train":
            out.append(":".join(fields[:-1] + ["val"]))
        elif fields[0] == "pennfudan" and len(fields) == 3 and fields[2] == "train":
            out.append(":".join(fields[:2] + ["test"]))
        elif len(fields) == 1 and spec.endswith("_train"):
            out.append(spec[: -len("_train")] + "_val")
        else:
            return None
    return out


def choose_recipe(cfg, stats: DatasetStats, train_specs: Sequence[str] = (), explicit: Set[str] = frozenset(),
                  world_size: int = 1, iter_size: int = 1) -> List[AutoChoice]:
    """The data-dependent choices for ``cfg`` (not applied; see :func:`apply_choices`). ``explicit`` keys are
    read from ``cfg`` where other choices depend on them (the learning rate on the batch). ``TRAIN.IMS_PER_BATCH``
    is per process; ``SOLVER.BASE_LR`` is for the total batch of an optimizer step: ``world_size`` processes
    (``torchrun``) x ``iter_size`` accumulated steps x the batch per process."""
    out: List[AutoChoice] = []
    add = lambda key, value, reason: out.append(AutoChoice(key, value, reason))  # noqa: E731
    k = stats.num_classes
    add("MODEL.NUM_CLASSES", k + 1, f"{k} class{'' if k == 1 else 'es'} in the training set, plus the background")

    size, max_size, why, med_short = _input_size(cfg, stats)
    add("TRAIN.SCALES", [size], why)
    add("TRAIN.MAX_SIZE", max_size, "as TRAIN.SCALES")
    add("TEST.SCALE", size, "the training scale")
    add("TEST.MAX_SIZE", max_size, "the training scale")
    add_test_aug_choices(cfg, size, max_size, explicit, add)

    boxes, hw = network_boxes(stats, size, max_size)
    iou = float(cfg.AUTO.ANCHOR_IOU)
    if cfg.FPN.FPN_ON or parse_conv_body_name(cfg.MODEL.CONV_BODY).kind == "fpn":  # FPN_ON is inferred later
        lo, hi = int(cfg.FPN.RPN_MIN_LEVEL), int(cfg.FPN.RPN_MAX_LEVEL)
        before = anchor_quality(boxes, hw, cfg.FPN.RPN_ANCHOR_START_SIZE, cfg.FPN.RPN_ASPECT_RATIOS, iou, lo, hi)
        fit = fit_fpn_anchors(boxes, hw, iou, lo, hi)
        where = (f"anchor fit over {fit.tried} sets on {len(boxes)} boxes at the chosen scale: {fit.quality} "
                 f"vs {before} for the config's start size {cfg.FPN.RPN_ANCHOR_START_SIZE}, ratios "
                 f"{list(cfg.FPN.RPN_ASPECT_RATIOS)}")
        add("FPN.RPN_ANCHOR_START_SIZE", fit.start_size, where)
        add("FPN.RPN_ASPECT_RATIOS", list(fit.ratios), "same anchor fit (h/w)")

    per_image = stats.objects_per_image
    p90 = float(np.percentile(per_image, 90))
    most = int(per_image.max())
    obj = f"objects per image: p90 {p90:.0f}, max {most}"
    add("TRAIN.RPN_BATCH_SIZE_PER_IM", int(np.clip(_pow2_at_least(32 * p90), 128, 256)),
        f"{obj}; about 32 sampled anchors per object keeps positives near half the sample")
    add("TRAIN.BATCH_SIZE_PER_IM", int(np.clip(_pow2_at_least(8 * p90), 64, 512)),
        f"{obj}; with TRAIN.FG_FRACTION {cfg.TRAIN.FG_FRACTION} that is at most about 2 foreground RoIs per "
        f"object for the box and mask heads (half of it gave cheaper steps and more AP in 5 minutes than 4 per "
        f"object, docs/auto.md)")
    post = int(np.clip(_round_to(50 * most, 50), 200, 1000))
    add("TRAIN.RPN_POST_NMS_TOP_N", post, f"{obj}; 50 proposals per object (fewer RoIs: a cheaper step)")
    add("TRAIN.RPN_PRE_NMS_TOP_N", post, "as many per level as are kept after NMS (Detectron's and torchvision's "
        "FPN rule; the NMS over more boxes costs a sixth of a late training step for crowded images)")
    tpost = int(np.clip(_round_to(25 * most, 50), 100, 1000))
    add("TEST.RPN_POST_NMS_TOP_N", tpost, f"{obj}; 25 proposals per object")
    add("TEST.RPN_PRE_NMS_TOP_N", tpost, "as many per level as test proposals are kept after NMS")
    add("TEST.DETECTIONS_PER_IM", int(np.clip(5 * most, 50, 100)), f"{obj}; 5 per object, 50..100")
    add("TEST.MASK_PASTE_METHOD", "detectron2", _paste_reason(stats))

    pixels = size * min(max_size, size * float(np.median(stats.image_hw.max(1) / stats.image_hw.min(1))))
    batch = 4 if pixels <= 256 * 256 else 2
    add("TRAIN.IMS_PER_BATCH", batch, f"input about {pixels ** 0.5:.0f}^2 px: "
        f"{'4 images keep a step under a second on 2 cores' if batch == 4 else '2 images per step at this size'}")
    if "TRAIN.IMS_PER_BATCH" in explicit:
        batch = int(cfg.TRAIN.IMS_PER_BATCH)
    add("TRAIN.ASPECT_RATIO_GROUP_FACTOR", *_aspect_group_choice(stats, size, max_size, batch))
    add_norm_choices(cfg, batch, explicit, add)
    add("SOLVER.BASE_LR", *_lr_choice(batch, world_size, iter_size))
    add("DATA_LOADER.CACHE_RAM_MB", *_cache_choice(cfg, stats))
    tests = _test_datasets(list(train_specs))
    if tests and not list(cfg.TEST.DATASETS):
        add("TEST.DATASETS", tests, "the validation split of the training set")
    return out


def add_test_aug_choices(cfg, size: int, max_size: int, explicit: Set[str],
                         add: Callable[[str, Any, str], None]) -> None:
    """``TEST.BBOX_AUG.*`` and ``TEST.MASK_AUG.*``: one more run of the box and mask stages at ``AUTO.TEST_AUG_SCALE``
    times the test scale (``TEST.SCALE`` / ``TEST.MAX_SIZE`` if explicit, else ``size`` / ``max_size``), each side
    rounded to 16 pixels; boxes merged with the plain run's by Detectron's ``UNION``, masks averaged (``SOFT_AVG``).

    The input scale above is the smallest that brings the small objects to ``AUTO.MIN_OBJECT_SIZE`` (half of it for
    wide size spreads), since every training step pays for its pixels; at test time one more pass is cheap. On the
    six tuning variants' 10-minute models (docs/auto.md, "Ninth round") the extra run at 1.25x gave +0.6 to +5.0
    box and +1.8 to +7.6 mask AP, where testing at 1.25x alone lost on ``tiny`` and ``large``. Nothing is chosen
    when ``AUTO.TEST_AUG_SCALE`` is 0 (or at most 1) or when any ``TEST.BBOX_AUG`` / ``TEST.MASK_AUG`` key is
    explicit (the user configures test-time augmentation).
    """
    factor = float(cfg.AUTO.TEST_AUG_SCALE)
    if (factor <= 1.0 or bool(cfg.MODEL.RPN_ONLY)
            or any(k.startswith(("TEST.BBOX_AUG.", "TEST.MASK_AUG.")) for k in explicit)):
        return
    test_size = int(cfg.TEST.SCALE) if "TEST.SCALE" in explicit else int(size)
    test_max = int(cfg.TEST.MAX_SIZE) if "TEST.MAX_SIZE" in explicit else int(max_size)
    # Halves rounded up (160 x 1.25 = 200 -> 208, as measured), where _round_to's round() goes to the even 192.
    nearest_16 = lambda x: int(math.floor(x * factor / 16.0 + 0.5)) * 16  # noqa: E731
    scale = max(16, nearest_16(test_size))
    longest = max(scale, nearest_16(test_max))
    why = (f"one more test run at {factor:g}x the test scale {test_size} (AUTO.TEST_AUG_SCALE): training runs at the "
           f"smallest scale that keeps small objects detectable, for cheap steps; at test time a second, larger view "
           f"is cheap (+0.6 to +5.0 box, +1.8 to +7.6 mask AP on the tuning variants, docs/auto.md)")
    add("TEST.BBOX_AUG.ENABLED", True, why)
    add("TEST.BBOX_AUG.SCALES", [scale], "the extra run's shorter side; its boxes join the plain run's (UNION)")
    add("TEST.BBOX_AUG.MAX_SIZE", longest, f"the extra run's longer side ({factor:g}x TEST.MAX_SIZE {test_max})")
    if bool(cfg.MODEL.MASK_ON):
        add("TEST.MASK_AUG.ENABLED", True, "the masks of the final boxes are predicted on the same two runs")
        add("TEST.MASK_AUG.SCALES", [scale], "as TEST.BBOX_AUG.SCALES; the two runs' mask probabilities averaged")
        add("TEST.MASK_AUG.MAX_SIZE", longest, "as TEST.BBOX_AUG.MAX_SIZE")


#: ``--auto``'s learning rate per image of an optimizer step's total batch (SGD, from scratch).
LR_PER_IMAGE = 0.005


def _lr_choice(batch: int, world_size: int = 1, iter_size: int = 1):
    """``(BASE_LR, reason)``: ``LR_PER_IMAGE`` per image of the total batch (the linear scaling rule), where the
    total is ``batch`` per process x ``world_size`` processes x ``iter_size`` accumulated steps."""
    world_size, iter_size = max(int(world_size), 1), max(int(iter_size), 1)
    total = int(batch) * world_size * iter_size
    parts = [f"{batch} per process"]
    if world_size > 1:
        parts.append(f"{world_size} processes")
    if iter_size > 1:
        parts.append(f"{iter_size} accumulated steps")
    of = f"{total}: {' x '.join(parts)}" if len(parts) > 1 else parts[0]
    return LR_PER_IMAGE * total, (f"{LR_PER_IMAGE:g} per image of the total batch ({of}), from scratch with "
                                  f"trainable norms, warm-up and SOLVER.CLIP_GRAD_NORM")


def batch_padding(stats: DatasetStats, min_size: int, max_size: int, batch: int, factor: int,
                  epochs: int = 8, seed: int = 0) -> float:
    """Fraction of a training batch's pixels that are padding, for the images read at the given resize, batched
    as the loader does (``batch`` images of one aspect group, ``TRAIN.ASPECT_RATIO_GROUP_FACTOR`` ``factor``,
    padded to the largest height and width, rounded up to 32) over ``epochs`` shuffled passes."""
    f = _scale_factors(stats, min_size, max_size)
    hw = np.round(stats.image_hw * f[:, None])
    groups = aspect_group_of(hw[:, 1], hw[:, 0], factor)
    rng = np.random.default_rng(seed)
    buffers: dict = {}
    padded = real = 0.0
    for _ in range(int(epochs)):
        for i in rng.permutation(len(hw)):
            buf = buffers.setdefault(int(groups[i]), [])
            buf.append(i)
            if len(buf) == batch:
                h, w = np.ceil(hw[buf].max(0) / 32.0) * 32.0
                padded += batch * h * w
                real += float((hw[buf, 0] * hw[buf, 1]).sum())
                buf.clear()
    return 1.0 - real / padded if padded else 0.0


#: ``TRAIN.ASPECT_RATIO_GROUP_FACTOR`` ``--auto`` chooses when it saves padding (torchvision's references' default).
FINE_ASPECT_FACTOR = 3


def _aspect_group_choice(stats: DatasetStats, min_size: int, max_size: int, batch: int):
    """``(factor, reason)``: torchvision's finer aspect groups when they cut a batch's pixels by 5% or more."""
    coarse = batch_padding(stats, min_size, max_size, batch, 0)
    fine = batch_padding(stats, min_size, max_size, batch, FINE_ASPECT_FACTOR)
    saved = 1.0 - (1.0 - coarse) / (1.0 - fine)  # fewer pixels per batch, for the same images
    what = (f"batches of {batch}: padding is {100 * coarse:.0f}% of their pixels with landscape/portrait groups, "
            f"{100 * fine:.0f}% with {2 * FINE_ASPECT_FACTOR + 2} aspect-ratio groups")
    if saved >= 0.05:
        return FINE_ASPECT_FACTOR, f"{what}: {100 * saved:.0f}% fewer pixels per step"
    return 0, f"{what}: the images' aspect ratios are alike, landscape/portrait groups suffice"


def _paste_reason(stats: DatasetStats) -> str:
    """Why ``--auto`` pastes masks the detectron2 way (evidence: docs/auto.md, the same models tested both ways)."""
    sizes = stats.box_sizes
    small = f"the 10th-percentile object is {np.percentile(sizes, 10):.0f} px" if len(sizes) else "no objects read"
    return (f"{small} in its image, where masks are pasted: the float box samples the mask at each pixel's centre, "
            f"where torchvision's paste rounds a padded box to whole pixels (up to a pixel off on each edge, much of "
            f"a small object's mask); both export")


#: Largest batch per process at which ``--auto`` trains with GroupNorm instead of BatchNorm.
GN_MAX_BATCH = 2


def add_norm_choices(cfg, batch: int, explicit: Set[str], add: Callable[[str, Any, str], None]) -> None:
    """``RESNETS.NORM``, ``FPN.USE_GN`` and ``TEST.FUSE_FROZEN_BN`` for ``batch`` images per process.

    BatchNorm trains on the statistics of the step's batch and tests on their running average. With 1-2 images of
    varied content per step (large inputs: the batch rule above) the two differ widely: on ``synthetic:span``
    (5-minute runs, docs/auto.md) the box classifier of a BN model gave the right class about 0.4 of the probability on
    training boxes with batch statistics but about 0.2 with the running ones, and GroupNorm (the same in training and
    test, the norm of "Rethinking ImageNet Pre-training" for training from scratch) doubled box AP. With 4 images
    the batch statistics are steadier and BN's steps cheaper (GN costs about 15% of a step here).
    """
    if "RESNETS.NORM" in explicit:
        norm = str(cfg.RESNETS.NORM)
    else:
        norm = "GN" if batch <= GN_MAX_BATCH else "BN"
        add("RESNETS.NORM", norm, f"{batch} image(s) per step: "
            + ("BatchNorm's batch statistics would stand far from its running averages at test time; GroupNorm "
               "normalises each image alike in training and test" if norm == "GN" else
               "BatchNorm's batch statistics are steady enough, and its steps are cheaper than GroupNorm's"))
    if "FPN.USE_GN" not in explicit:
        add("FPN.USE_GN", norm == "GN", f"as RESNETS.NORM ({norm})")
    if norm == "GN":
        add("TEST.FUSE_FROZEN_BN", False, "a GroupNorm body has no BatchNorm to fold at test time")


def _get(cfg, key: str):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def _set(cfg, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node[p]
    old = node[parts[-1]]
    node[parts[-1]] = type(old)(value) if isinstance(old, (int, float)) and not isinstance(old, bool) else value


def apply_choices(cfg, choices: Sequence[AutoChoice], explicit: Set[str],
                  log: Optional[Callable[[str], Any]] = print) -> List[AutoChoice]:
    """Write the choices whose key is not in ``explicit`` into the (unfrozen) ``cfg``; log one line per choice."""
    for c in choices:
        if c.key in explicit:
            c.explicit, c.kept = True, _get(cfg, c.key)
        else:
            _set(cfg, c.key, c.value)
        if log is not None:
            log(c.line())
    return list(choices)


# --- schedule for a time budget -------------------------------------------------------------------------------------
def schedule_for(max_iter: int) -> dict:
    """Steps at 80% and 93% of the run, warm-up over its first 1/7 (at most 100 iterations)."""
    max_iter = int(max_iter)
    return {"SOLVER.MAX_ITER": max_iter,
            "SOLVER.STEPS": [0, max(1, round(0.8 * max_iter)), max(2, round(0.93 * max_iter))],
            "SOLVER.WARM_UP_ITERS": max(1, min(100, max_iter // 7)),
            "TRAIN.SNAPSHOT_ITERS": max(1, max_iter // 2)}


def time_training_steps(cfg, dataset, device, n_timed: int, n_warm: int = 2,
                        data_times: Optional[List[float]] = None) -> List[float]:
    """Seconds of each of ``n_timed`` real training steps (data loading included) of a throw-away model built
    from ``cfg``, after ``n_warm`` untimed ones; the loading part of each is appended to ``data_times``."""
    (times, data), = time_training_steps_alternated([cfg], dataset, device, n_timed, n_warm)
    if data_times is not None:
        data_times.extend(data)
    return times


def time_training_steps_alternated(cfgs: Sequence[Any], dataset, device, n_timed: int, n_warm: int = 2
                                   ) -> List[Tuple[List[float], List[float]]]:
    """:func:`time_training_steps` for several configs at once: one throw-away model per config, each on its own
    loader with the same seed (so the same batches), warmed up, then their timed steps alternate (the first of
    each round rotates), so that a slower or faster stretch of the machine falls on every config alike.
    Returns ``(step times, loading times)`` per config, in seconds."""
    import torch

    from ..data.build import build_train_loader
    from ..modeling.generalized_rcnn import Generalized_RCNN
    from .solver import build_lr_scheduler, build_optimizer_from_cfg
    from .speed import prepare_for_training
    from .trainer import Trainer

    trainers, loaders = [], []
    try:
        for cfg in cfgs:
            model = Generalized_RCNN(cfg).to(device)
            prepare_for_training(model, cfg)
            optimizer = build_optimizer_from_cfg(model, cfg)
            loaders.append(build_train_loader(
                dataset, ims_per_batch=cfg.TRAIN.IMS_PER_BATCH, num_workers=cfg.DATA_LOADER.NUM_THREADS,
                aspect_grouping=cfg.TRAIN.ASPECT_GROUPING, aspect_group_factor=cfg.TRAIN.ASPECT_RATIO_GROUP_FACTOR,
                seed=cfg.RNG_SEED + 1, flip=cfg.TRAIN.USE_FLIPPED, validate=False))
            trainers.append(Trainer(model, optimizer, build_lr_scheduler(optimizer, cfg), loaders[-1],
                                    max_iter=n_warm + n_timed, amp=cfg.TRAIN.AMP, device=device,
                                    clip_grad_norm=cfg.SOLVER.CLIP_GRAD_NORM, skip_nonfinite=True,
                                    max_consecutive_skips=n_warm + n_timed + 1))
            model.train()
        results: List[Tuple[List[float], List[float]]] = [([], []) for _ in trainers]

        def step(k: int, i: int) -> None:
            trainer = trainers[k]
            trainer.iter = i
            trainer.run_step()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if i >= n_warm:
                results[k][0].append(trainer.step_time)
                results[k][1].append(trainer.data_time)

        for i in range(n_warm + n_timed):
            for j in range(len(trainers)):
                step((i + j) % len(trainers), i)
    finally:
        for loader in loaders:
            loader.close()
    return results


#: bf16 autocast is chosen when its median timed step is at most this fraction of fp32's: on a CPU with AMX it was
#: 0.80-0.95 (every BatchNorm run of the table; docs/auto.md, eighth round) and 1.09 for tiny's GroupNorm model, which
#: kept fp32; without native bf16 it is slower, and fp32 stays.
BF16_MIN_SPEEDUP = 0.95


def _bf16_supported(device) -> bool:
    import torch

    from .onednn_fusion import onednn_supports_dtype

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and onednn_supports_dtype(torch.bfloat16)


def _tries_bf16(cfg, device, explicit: Set[str]) -> bool:
    """Whether ``--auto`` times bf16 autocast against fp32: ``AUTO.TRY_BF16`` on, ``TRAIN.AMP`` neither set nor
    explicit, and native bf16 on ``device``."""
    return bool(cfg.AUTO.TRY_BF16) and not str(cfg.TRAIN.AMP) and "TRAIN.AMP" not in explicit and \
        _bf16_supported(device)


def _amp_choice(amp: str, fp32: Tuple[List[float], List[float]], bf16: Tuple[List[float], List[float]]):
    """``(choice, times, data)`` from alternated fp32 and bf16-autocast steps on the same batches (each a pair of
    step and loading times): the :class:`AutoChoice` of ``TRAIN.AMP`` and the chosen precision's times."""
    (times, data), (times16, data16) = fp32, bf16
    t32, t16 = statistics.median(times), statistics.median(times16)
    timed = (f"{len(times)} alternated steps on the same batches: bf16 autocast {t16:.3f} s, fp32 {t32:.3f} s "
             "(median)")
    if t16 <= BF16_MIN_SPEEDUP * t32:
        return AutoChoice("TRAIN.AMP", "bf16", f"{timed}: {t16 / t32:.2f}x the time"), times16, data16
    return AutoChoice("TRAIN.AMP", amp, f"{timed}: not {1 - BF16_MIN_SPEEDUP:.0%} faster, fp32 kept"), times, data


def fit_schedule_to_budget(cfg, dataset, device, explicit: Set[str], started: float,
                           log: Optional[Callable[[str], Any]] = print,
                           broadcast: Optional[Callable[[Any], Any]] = None,
                           world_size: int = 1) -> List[AutoChoice]:
    """Size ``SOLVER.MAX_ITER`` (and its steps, warm-up, snapshots) so training ends ``AUTO.BUDGET_MINUTES`` after
    ``started`` (a ``time.time()``): time ``AUTO.TIMING_ITERS`` steps, divide the time left. ``cfg`` must be
    unfrozen; nothing changes when the budget is 0 or ``SOLVER.MAX_ITER`` is explicit. ``broadcast`` shares rank
    0's measurement with every process; ``world_size`` processes share an epoch (the cache's first-epoch cost)."""
    budget_s = float(cfg.AUTO.BUDGET_MINUTES) * 60.0
    if budget_s <= 0:
        return []
    if "SOLVER.MAX_ITER" in explicit:
        if log is not None:
            log(f"auto: SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER} kept (explicit); the {budget_s / 60:.1f} min budget "
                f"is not applied")
        return []
    n_timed = max(int(cfg.AUTO.TIMING_ITERS), 1)
    amp_choice = None
    if _tries_bf16(cfg, device, explicit):
        cfg16 = cfg.clone()
        cfg16.defrost()
        cfg16.TRAIN.AMP = "bf16"
        fp32, bf16 = time_training_steps_alternated([cfg, cfg16], dataset, device, n_timed)
        amp_choice, times, data = _amp_choice(str(cfg.TRAIN.AMP), fp32, bf16)
    else:
        data: List[float] = []
        times = time_training_steps(cfg, dataset, device, n_timed, data_times=data)
    per_iter, per_load = statistics.median(times), statistics.median(data)
    if broadcast is not None:
        # Rank 0 decides for all: every process must train in the same precision.
        amp_choice, per_iter, per_load = broadcast((amp_choice, per_iter, per_load))
    amp_choices = apply_choices(cfg, [amp_choice], explicit, log) if amp_choice is not None else []
    left = budget_s - (time.time() - started)
    # 3% for logging and the checkpoints; the first iterations of a run are a little slower.
    usable = 0.97 * left
    spread = f"{min(times):.2f}-{max(times):.2f}"
    reason = (f"{len(times)} timed steps: median {per_iter:.3f} s/iteration (spread {spread}); {left:.0f} s left "
              f"of the {budget_s / 60:.1f} min budget (AUTO.BUDGET_MINUTES)")
    cached = float(cfg.DATA_LOADER.CACHE_RAM_MB) > 0 and int(cfg.DATA_LOADER.NUM_THREADS) == 0
    epoch = math.ceil(len(dataset) / max(int(cfg.TRAIN.IMS_PER_BATCH) * max(int(world_size), 1), 1)) if cached else 0
    if cached and usable > epoch * per_iter and per_load < per_iter:
        # Items are decoded once (DATA_LOADER.CACHE_RAM_MB): only the first epoch's steps pay the loading.
        max_iter = epoch + int((usable - epoch * per_iter) / (per_iter - per_load))
        reason += (f"; loading ({per_load:.3f} s of it) is paid only in the first epoch ({epoch} iterations): the "
                   f"items stay in memory (DATA_LOADER.CACHE_RAM_MB)")
    else:
        max_iter = int(usable / per_iter)
    max_iter = max(20, max_iter)
    choices = [AutoChoice(k, v, reason if k == "SOLVER.MAX_ITER" else f"from SOLVER.MAX_ITER {max_iter}")
               for k, v in schedule_for(max_iter).items()]
    return amp_choices + apply_choices(cfg, choices, explicit, log)
