"""--auto's choices: budget parsing, explicit keys (file with _BASE_, --set, flags), the input scale and anchors
following the data, an explicit key always winning, and the schedule for a budget."""
import time

import numpy as np
import pytest

from maskrcnn.cli.auto import load_auto_cfg
from maskrcnn.config import ConfigError
from maskrcnn.data.stats import DatasetStats
from maskrcnn.engine import auto_recipe
from maskrcnn.engine.auto_recipe import (apply_choices, choose_recipe, explicit_keys, fit_schedule_to_budget,
                                         network_boxes, parse_budget, schedule_for)


def _stats(side, box_sizes, aspect=1.0, per_image=3, classes=3):
    """Square ``side`` px images with ``per_image`` boxes of the given sqrt-areas and h/w ``aspect``."""
    rng = np.random.default_rng(0)
    sizes = np.asarray(box_sizes, dtype=np.float64)
    w, h = sizes / np.sqrt(aspect), sizes * np.sqrt(aspect)
    x = rng.uniform(0, 1, len(sizes)) * (side - w)
    y = rng.uniform(0, 1, len(sizes)) * (side - h)
    n_img = int(np.ceil(len(sizes) / per_image))
    return DatasetStats(num_images=n_img, image_hw=np.full((n_img, 2), float(side)),
                        boxes=np.stack([x, y, x + w, y + h], 1), box_image=np.arange(len(sizes)) // per_image,
                        objects_per_image=np.bincount(np.arange(len(sizes)) // per_image, minlength=n_img),
                        class_counts=np.ones(classes, np.int64), crowd_regions=0,
                        classes=["__background__"] + [f"c{k}" for k in range(classes)])


def _choices(cfg, stats, **kw):
    return {c.key: c for c in choose_recipe(cfg, stats, **kw)}


def test_parse_budget():
    assert parse_budget("10min") == 10.0 and parse_budget("90s") == 1.5 and parse_budget("1.5h") == 90.0
    assert parse_budget("7") == 7.0 and parse_budget("2 minutes") == 2.0
    with pytest.raises(ConfigError, match="--budget 'soon'"):
        parse_budget("soon")


def test_explicit_keys_from_file_with_base_set_and_flags(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("TRAIN:\n  SCALES: [200]\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nFPN:\n  RPN_ANCHOR_START_SIZE: 8\n")
    keys = explicit_keys(str(child), ["SOLVER.BASE_LR", "0.1", "TEST.SCALE", "300"], {"TRAIN.IMS_PER_BATCH"})
    assert keys == {"TRAIN.SCALES", "FPN.RPN_ANCHOR_START_SIZE", "SOLVER.BASE_LR", "TEST.SCALE",
                    "TRAIN.IMS_PER_BATCH"}
    assert explicit_keys(None, []) == set()


def test_scale_and_anchors_follow_object_sizes():
    cfg = load_auto_cfg(None)
    small = _choices(cfg, _stats(200, np.linspace(5, 12, 60)))
    large = _choices(cfg, _stats(400, np.linspace(150, 350, 60)))
    # tiny objects: enlarge (up to AUTO.MAX_UPSCALE x the median image); large ones: shrink to AUTO.MIN_INPUT_SIZE
    assert small["TRAIN.SCALES"].value == [400] and small["TEST.SCALE"].value == 400
    assert large["TRAIN.SCALES"].value == [128] and large["TRAIN.MAX_SIZE"].value == 128
    assert small["FPN.RPN_ANCHOR_START_SIZE"].value < large["FPN.RPN_ANCHOR_START_SIZE"].value
    assert "recall@0.5" in small["FPN.RPN_ANCHOR_START_SIZE"].reason
    assert small["MODEL.NUM_CLASSES"].value == 4
    tall = _choices(cfg, _stats(200, np.linspace(30, 60, 60), aspect=3.0))
    assert max(tall["FPN.RPN_ASPECT_RATIOS"].value) >= 2.5


def test_sampling_sizes_follow_objects_per_image():
    cfg = load_auto_cfg(None)
    few = _choices(cfg, _stats(200, np.full(40, 30.0), per_image=2))
    many = _choices(cfg, _stats(200, np.full(400, 30.0), per_image=20))
    assert few["TRAIN.BATCH_SIZE_PER_IM"].value == 64 and many["TRAIN.BATCH_SIZE_PER_IM"].value == 256
    assert few["TRAIN.RPN_POST_NMS_TOP_N"].value < many["TRAIN.RPN_POST_NMS_TOP_N"].value
    assert few["TEST.DETECTIONS_PER_IM"].value == 50 and many["TEST.DETECTIONS_PER_IM"].value == 100


def test_masks_pasted_at_float_boxes():
    # detectron2's paste (no integer rounding of the box): on the table's tiny models mask AP 44.5 -> 70.6.
    cfg = load_auto_cfg(None)
    choice = _choices(cfg, _stats(200, np.linspace(5, 12, 60)))["TEST.MASK_PASTE_METHOD"]
    assert choice.value == "detectron2" and "10th-percentile object is 6 px" in choice.reason
    applied = cfg.clone()
    auto_recipe.apply_choices(applied, [choice], explicit={"TEST.MASK_PASTE_METHOD"}, log=None)
    assert applied.TEST.MASK_PASTE_METHOD == cfg.TEST.MASK_PASTE_METHOD == "torchvision"  # an explicit key wins
    choice = _choices(cfg, _stats(200, np.linspace(5, 12, 60)))["TEST.MASK_PASTE_METHOD"]
    auto_recipe.apply_choices(applied, [choice], explicit=set(), log=None)
    assert applied.TEST.MASK_PASTE_METHOD == "detectron2"


def test_fine_aspect_groups_when_they_save_padding():
    cfg = load_auto_cfg(None)
    square = _choices(cfg, _stats(192, np.full(60, 40.0)))["TRAIN.ASPECT_RATIO_GROUP_FACTOR"]
    assert square.value == 0 and "alike" in square.reason
    # Landscape images of widths 1x to 3x their height: landscape/portrait groups pad a batch to its widest image.
    stats = _stats(192, np.full(120, 40.0))
    stats.image_hw = np.stack([np.full(len(stats.image_hw), 192.0), np.linspace(192, 576, len(stats.image_hw))], 1)
    coarse = auto_recipe.batch_padding(stats, 192, 576, 4, 0)
    fine = auto_recipe.batch_padding(stats, 192, 576, 4, 3)
    assert coarse > 0.2 and fine < coarse / 2
    varied = _choices(cfg, stats)["TRAIN.ASPECT_RATIO_GROUP_FACTOR"]
    assert varied.value == 3 and "fewer pixels per step" in varied.reason


def test_cache_holds_small_sets_only(monkeypatch):
    cfg = load_auto_cfg(None)
    monkeypatch.setattr(auto_recipe, "_available_ram_mb", lambda: 16000.0)
    # 20 images of 200x200 with 2 objects: 200*200*(12 + 2 + 1) bytes each = 11.4 MiB, 1.25x rounded up to 16 MiB
    small = _choices(cfg, _stats(200, np.full(40, 30.0), per_image=2))["DATA_LOADER.CACHE_RAM_MB"]
    assert small.value == 16 and "decoded once" in small.reason
    # 4000 images of 1000x1000 would need about 57 GiB: no cache (the limit is 4 GiB or a quarter of free memory)
    big = _choices(cfg, _stats(1000, np.full(8000, 30.0), per_image=2))["DATA_LOADER.CACHE_RAM_MB"]
    assert big.value == 0 and "4000 MiB" in big.reason
    cfg.DATA_LOADER.NUM_THREADS = 2
    workers = _choices(cfg, _stats(200, np.full(40, 30.0), per_image=2))["DATA_LOADER.CACHE_RAM_MB"]
    assert workers.value == 0 and "NUM_THREADS = 2" in workers.reason


def test_network_boxes_scale_with_the_chosen_size():
    s = _stats(200, [20.0, 40.0])
    boxes, hw = network_boxes(s, 400, 400)
    np.testing.assert_allclose(boxes, s.boxes * 2)
    assert hw.tolist() == [[416.0, 416.0]] * 2  # padded to /32


def test_wide_size_spread_halves_the_small_object_target():
    """Objects from a few pixels to most of the image (sizes spread >= 8x from p10 to p90): the 10th-percentile object
    is brought to 8 px instead of 16, so the input stays small; a narrow spread with the same p10 keeps 16 px."""
    cfg = load_auto_cfg(None)
    wide_sizes = np.geomspace(12, 280, 60)  # on 300 px images: p10 about 16 px, p90 about 210 px
    wide = _choices(cfg, _stats(300, wide_sizes))
    narrow = _choices(cfg, _stats(300, np.linspace(15, 30, 60)))
    p10 = np.percentile(wide_sizes, 10) / 300
    assert wide["TRAIN.SCALES"].value == [int(round(8 / p10 / 16) * 16)]
    assert "half of AUTO.MIN_OBJECT_SIZE=16" in wide["TRAIN.SCALES"].reason
    assert narrow["TRAIN.SCALES"].value[0] > wide["TRAIN.SCALES"].value[0]
    assert "half" not in narrow["TRAIN.SCALES"].reason


def test_norm_follows_the_batch():
    """1-2 images per step: GroupNorm in the body and FPN (and nothing to fold at test); 4: BatchNorm. An explicit
    RESNETS.NORM is kept and the FPN follows it."""
    cfg = load_auto_cfg(None)
    small = _choices(cfg, _stats(200, np.linspace(5, 12, 60)))  # upscaled to 400 px: 2 images per step
    large = _choices(cfg, _stats(400, np.linspace(150, 350, 60)))  # 128 px: 4 images per step
    assert small["TRAIN.IMS_PER_BATCH"].value == 2 and small["RESNETS.NORM"].value == "GN"
    assert small["FPN.USE_GN"].value is True and small["TEST.FUSE_FROZEN_BN"].value is False
    assert large["TRAIN.IMS_PER_BATCH"].value == 4 and large["RESNETS.NORM"].value == "BN"
    assert large["FPN.USE_GN"].value is False and "TEST.FUSE_FROZEN_BN" not in large
    cfg.RESNETS.NORM = "BN"
    kept = _choices(cfg, _stats(200, np.linspace(5, 12, 60)), explicit={"RESNETS.NORM"})
    assert "RESNETS.NORM" not in kept and kept["FPN.USE_GN"].value is False


def test_gn_choice_builds_trains_and_tests():
    """The GroupNorm recipe --auto chooses builds the eighth-width body (8-64 channels), takes a training step and
    runs at test time with the choices applied."""
    import torch

    from maskrcnn.engine.speed import prepare_for_inference
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

    cfg = load_auto_cfg(None)
    apply_choices(cfg, choose_recipe(cfg, _stats(200, np.linspace(5, 12, 60))), set(), lambda line: None)
    assert cfg.RESNETS.NORM == "GN" and cfg.FPN.USE_GN
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.Conv_Body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    image = torch.rand(3, 96, 96)
    target = {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 96, 96, dtype=torch.uint8)}
    target["masks"][0, 12:50, 10:40] = 1
    losses = model([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ConfigError, match="uses GroupNorm"):  # int8 folds norms into convs: not for GN
        prepare_for_inference(model, cfg, quantize="int8", calib_images=[image])
    prepare_for_inference(model, cfg)
    with torch.no_grad():
        out = model([image])
    assert set(out[0]) >= {"boxes", "scores", "labels", "masks"}


def test_explicit_key_wins_and_is_reported():
    cfg = load_auto_cfg(None)
    cfg.TRAIN.SCALES = [96]
    cfg.TRAIN.IMS_PER_BATCH = 8
    explicit = {"TRAIN.SCALES", "TRAIN.IMS_PER_BATCH"}
    lines = []
    applied = apply_choices(cfg, choose_recipe(cfg, _stats(200, np.linspace(5, 12, 60)), explicit=explicit),
                            explicit, lines.append)
    assert cfg.TRAIN.SCALES == [96] and cfg.TRAIN.IMS_PER_BATCH == 8
    assert cfg.TEST.SCALE == 400  # not explicit: chosen
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.04)  # the lr follows the explicit batch
    kept = [c for c in applied if c.explicit]
    assert {c.key for c in kept} == explicit
    assert any(line.startswith("auto: TRAIN.SCALES = [96] kept (explicit); auto would choose [400]") for line in lines)
    assert any(line.startswith("auto: TEST.SCALE = 400  (") for line in lines)


def test_one_more_test_run_at_a_larger_scale():
    cfg = load_auto_cfg(None)
    stats = _stats(200, np.linspace(5, 12, 60))  # chooses TEST.SCALE 400 (see above)
    ch = _choices(cfg, stats)
    assert ch["TEST.SCALE"].value == 400
    assert ch["TEST.BBOX_AUG.ENABLED"].value is True and ch["TEST.MASK_AUG.ENABLED"].value is True
    assert ch["TEST.BBOX_AUG.SCALES"].value == [496] == ch["TEST.MASK_AUG.SCALES"].value  # 1.25 x 400, to 16 px
    assert ch["TEST.BBOX_AUG.MAX_SIZE"].value == 496 == ch["TEST.MASK_AUG.MAX_SIZE"].value
    assert "AUTO.TEST_AUG_SCALE" in ch["TEST.BBOX_AUG.ENABLED"].reason
    apply_choices(cfg, list(ch.values()), set(), log=None)
    assert cfg.TEST.BBOX_AUG.ENABLED and cfg.TEST.BBOX_AUG.SCALES == [496] and cfg.TEST.MASK_AUG.MAX_SIZE == 496
    assert not cfg.TEST.BBOX_AUG.H_FLIP and cfg.TEST.BBOX_AUG.SCORE_HEUR == "UNION"

    # Sides rounded to 16 px: 1.25 x (176, 336) = (220, 420) -> (224, 416); 1.25 x 160 = 200 -> 208.
    cfg = load_auto_cfg(None)
    cfg.TEST.SCALE, cfg.TEST.MAX_SIZE = 176, 336
    ch = _choices(cfg, stats, explicit={"TEST.SCALE", "TEST.MAX_SIZE"})  # an explicit test scale is the base
    assert ch["TEST.BBOX_AUG.SCALES"].value == [224] and ch["TEST.BBOX_AUG.MAX_SIZE"].value == 416
    cfg.TEST.SCALE, cfg.TEST.MAX_SIZE = 160, 160
    ch = _choices(cfg, stats, explicit={"TEST.SCALE", "TEST.MAX_SIZE"})
    assert ch["TEST.BBOX_AUG.SCALES"].value == [208] and ch["TEST.MASK_AUG.MAX_SIZE"].value == 208


@pytest.mark.parametrize("change", ["off", "explicit_aug", "rpn_only", "no_masks"])
def test_no_test_augmentation_when_off_or_configured_by_the_user(change):
    cfg = load_auto_cfg(None)
    explicit = set()
    if change == "off":
        cfg.AUTO.TEST_AUG_SCALE = 0.0
    elif change == "explicit_aug":
        explicit = {"TEST.MASK_AUG.H_FLIP"}
    elif change == "rpn_only":
        cfg.MODEL.RPN_ONLY = True
    else:
        cfg.MODEL.MASK_ON = False
    keys = set(_choices(cfg, _stats(200, np.linspace(5, 12, 60)), explicit=explicit))
    aug = {k for k in keys if k.startswith(("TEST.BBOX_AUG.", "TEST.MASK_AUG."))}
    if change == "no_masks":
        assert aug == {"TEST.BBOX_AUG.ENABLED", "TEST.BBOX_AUG.SCALES", "TEST.BBOX_AUG.MAX_SIZE"}
    else:
        assert aug == set()


def test_lr_is_for_the_total_batch_of_processes_and_accumulated_steps():
    cfg = load_auto_cfg(None)
    stats = _stats(200, np.linspace(20, 60, 60))
    one = _choices(cfg, stats)
    batch = one["TRAIN.IMS_PER_BATCH"].value
    assert one["SOLVER.BASE_LR"].value == pytest.approx(0.005 * batch)
    assert f"total batch ({batch} per process)" in one["SOLVER.BASE_LR"].reason
    two = _choices(cfg, stats, world_size=2)
    assert two["TRAIN.IMS_PER_BATCH"].value == batch  # the batch stays per process
    assert two["SOLVER.BASE_LR"].value == pytest.approx(0.005 * 2 * batch)
    assert f"({2 * batch}: {batch} per process x 2 processes)" in two["SOLVER.BASE_LR"].reason
    acc = _choices(cfg, stats, world_size=2, iter_size=3)
    assert acc["SOLVER.BASE_LR"].value == pytest.approx(0.005 * 6 * batch)
    assert "x 2 processes x 3 accumulated steps" in acc["SOLVER.BASE_LR"].reason


def test_test_datasets_and_schedule():
    cfg = load_auto_cfg(None)
    c = _choices(cfg, _stats(200, np.full(10, 30.0)), train_specs=["synthetic:tiny:train"])
    assert c["TEST.DATASETS"].value == ["synthetic:tiny:val"]
    assert "TEST.DATASETS" not in _choices(cfg, _stats(200, np.full(10, 30.0)), train_specs=["coco:a.json:imgs"])
    assert schedule_for(1000) == {"SOLVER.MAX_ITER": 1000, "SOLVER.STEPS": [0, 800, 930],
                                  "SOLVER.WARM_UP_ITERS": 100, "TRAIN.SNAPSHOT_ITERS": 500}
    assert schedule_for(70)["SOLVER.WARM_UP_ITERS"] == 10


def test_budget_divides_the_time_left_by_the_median_step(monkeypatch):
    cfg = load_auto_cfg(None)
    cfg.AUTO.BUDGET_MINUTES, cfg.AUTO.TIMING_ITERS, cfg.AUTO.TRY_BF16 = 1.0, 3, False
    calls = []

    def fake_steps(cfg_, dataset, device, n, data_times=None):
        calls.append(n)
        data_times.extend([0.1, 0.2, 0.1][:n])
        return [0.6, 0.4, 0.5][:n]

    monkeypatch.setattr(auto_recipe, "time_training_steps", fake_steps)
    lines = []
    fit_schedule_to_budget(cfg, None, "cpu", set(), time.time() - 10.0, lines.append)
    assert calls == [3]
    # about 50 s left (60 s budget, 10 s spent), 0.5 s per step, 3% kept for logging and checkpoints
    assert cfg.SOLVER.MAX_ITER in (96, 97)
    assert cfg.SOLVER.STEPS == schedule_for(cfg.SOLVER.MAX_ITER)["SOLVER.STEPS"]
    assert lines[0].startswith(f"auto: SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER}  (3 timed steps: median 0.500 "
                               f"s/iteration (spread 0.40-0.60)")
    # items kept in memory (DATA_LOADER.CACHE_RAM_MB): loading (median 0.1 s) is paid in the first epoch only,
    # 40 images / 4 per batch = 10 iterations: 10 + (48.5 - 10 * 0.5) / 0.4 = 118
    cfg.DATA_LOADER.CACHE_RAM_MB, cfg.DATA_LOADER.NUM_THREADS, cfg.TRAIN.IMS_PER_BATCH = 64, 0, 4
    lines = []
    fit_schedule_to_budget(cfg, list(range(40)), "cpu", set(), time.time() - 10.0, lines.append)
    assert cfg.SOLVER.MAX_ITER in (117, 118, 119)
    assert "paid only in the first epoch (10 iterations)" in lines[0]
    cfg.DATA_LOADER.CACHE_RAM_MB = 0
    # already over budget: the floor of 20 iterations
    fit_schedule_to_budget(cfg, None, "cpu", set(), time.time() - 120.0, None)
    assert cfg.SOLVER.MAX_ITER == 20
    # an explicit SOLVER.MAX_ITER or a zero budget: nothing timed, nothing changed
    cfg.SOLVER.MAX_ITER = 7
    assert fit_schedule_to_budget(cfg, None, "cpu", {"SOLVER.MAX_ITER"}, time.time(), None) == []
    cfg.AUTO.BUDGET_MINUTES = 0.0
    assert fit_schedule_to_budget(cfg, None, "cpu", set(), time.time(), None) == []
    assert cfg.SOLVER.MAX_ITER == 7 and calls == [3, 3, 3]


@pytest.mark.parametrize("bf16_times,chosen", [([0.3, 0.4, 0.35], "bf16"), ([0.48, 0.5, 0.49], "")])
def test_bf16_is_chosen_when_its_timed_steps_are_faster(monkeypatch, bf16_times, chosen):
    cfg = load_auto_cfg(None)
    cfg.AUTO.BUDGET_MINUTES, cfg.AUTO.TIMING_ITERS = 1.0, 3
    calls = []

    def fake_alternated(cfgs, dataset, device, n, n_warm=2):
        calls.append([c.TRAIN.AMP for c in cfgs])
        return [(list(bf16_times) if c.TRAIN.AMP == "bf16" else [0.6, 0.4, 0.5], [0.0] * n) for c in cfgs]

    monkeypatch.setattr(auto_recipe, "time_training_steps_alternated", fake_alternated)
    monkeypatch.setattr(auto_recipe, "_bf16_supported", lambda device: True)
    lines = []
    made = fit_schedule_to_budget(cfg, None, "cpu", set(), time.time() - 10.0, lines.append)
    assert calls == [["", "bf16"]]  # fp32 and bf16 in one alternated run, on the same batches
    assert cfg.TRAIN.AMP == chosen and made[0].key == "TRAIN.AMP"
    assert lines[0].startswith(f"auto: TRAIN.AMP = {chosen!r}  (3 alternated steps on the same batches: bf16 "
                               f"autocast {sorted(bf16_times)[1]:.3f} s, fp32 0.500 s (median)")
    # the schedule is sized with the chosen precision's steps: about 48.5 s / median step
    per_iter = sorted(bf16_times)[1] if chosen else 0.5
    assert abs(cfg.SOLVER.MAX_ITER - 48.5 / per_iter) <= 1.5
    assert "not 5% faster, fp32 kept" in lines[0] if not chosen else "0.70x the time" in lines[0]


def test_bf16_is_not_timed_when_amp_is_set_or_turned_off_or_not_native(monkeypatch):
    calls = []

    def fake_steps(cfg_, dataset, device, n, data_times=None):
        calls.append(cfg_.TRAIN.AMP)
        data_times.extend([0.0] * n)
        return [0.5] * n

    monkeypatch.setattr(auto_recipe, "time_training_steps", fake_steps)
    monkeypatch.setattr(auto_recipe, "_bf16_supported", lambda device: True)
    for key, value, explicit in (("TRAIN.AMP", "", {"TRAIN.AMP"}), ("TRAIN.AMP", "bf16", {"TRAIN.AMP"}),
                                 ("AUTO.TRY_BF16", False, set())):
        cfg = load_auto_cfg(None)
        cfg.AUTO.BUDGET_MINUTES, cfg.AUTO.TIMING_ITERS = 1.0, 3
        cfg.merge_from_list([key, value])
        calls.clear()
        made = fit_schedule_to_budget(cfg, None, "cpu", explicit, time.time(), None)
        assert calls == [str(cfg.TRAIN.AMP)] and [c.key for c in made][0] == "SOLVER.MAX_ITER"
        assert cfg.TRAIN.AMP == (value if key == "TRAIN.AMP" else "")
    monkeypatch.setattr(auto_recipe, "_bf16_supported", lambda device: False)
    cfg = load_auto_cfg(None)
    cfg.AUTO.BUDGET_MINUTES, cfg.AUTO.TIMING_ITERS = 1.0, 3
    calls.clear()
    fit_schedule_to_budget(cfg, None, "cpu", set(), time.time(), None)
    assert calls == [""] and cfg.TRAIN.AMP == ""


def test_bf16_support_check_names_the_device():
    assert auto_recipe._bf16_supported("meta") is False
    assert isinstance(auto_recipe._bf16_supported("cpu"), bool)
