import io
import math

import pytest
import torch
from torch import nn

from maskrcnn.config import get_cfg
from maskrcnn.engine.solver import (LRSchedule, WarmupMultiStepLR, build_lr_scheduler, build_optimizer,
                                    build_optimizer_from_cfg, lr_at, scale_schedule)


# --- lr_at --------------------------------------------------------------------------------------------------------
def test_lr_values_at_chosen_iterations():
    kw = dict(base_lr=0.02, policy="steps_with_decay", steps=[0, 60000, 80000], gamma=0.1, warmup_iters=500,
              warmup_factor=1.0 / 3.0, warmup_method="linear")
    assert lr_at(0, **kw) == pytest.approx(0.02 / 3)
    assert lr_at(250, **kw) == pytest.approx(0.02 * (1 / 3 * 0.5 + 0.5))
    assert lr_at(500, **kw) == pytest.approx(0.02)
    assert lr_at(59999, **kw) == pytest.approx(0.02)
    assert lr_at(60000, **kw) == pytest.approx(0.002)
    assert lr_at(79999, **kw) == pytest.approx(0.002)
    assert lr_at(80000, **kw) == pytest.approx(0.0002)
    assert lr_at(89999, **kw) == pytest.approx(0.0002)


def test_leading_zero_in_steps_is_optional():
    for it in (0, 10, 29, 30, 31, 45, 100):
        assert lr_at(it, 1.0, steps=[0, 30, 45]) == lr_at(it, 1.0, steps=[30, 45])


def test_constant_policy_and_constant_warmup():
    assert lr_at(10**6, 0.5, policy="constant", steps=[0, 10]) == 0.5
    assert lr_at(3, 0.5, policy="constant", warmup_iters=10, warmup_factor=0.1, warmup_method="constant") == \
        pytest.approx(0.05)
    assert lr_at(10, 0.5, policy="constant", warmup_iters=10, warmup_factor=0.1, warmup_method="constant") == 0.5


def test_warmup_multiplies_decayed_lr():
    # A step inside the warm-up: both factors apply (Detectron).
    assert lr_at(5, 1.0, steps=[0, 4], gamma=0.1, warmup_iters=10, warmup_factor=0.0) == pytest.approx(0.1 * 0.5)


@pytest.mark.parametrize("bad", [dict(policy="cosine"), dict(warmup_method="exp", warmup_iters=5)])
def test_lr_at_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="policy|warmup_method"):
        lr_at(0, 1.0, **bad)


def test_schedule_matches_torch_linear_and_multistep_schedulers():
    # Oracle: torch's LinearLR warm-up chained with MultiStepLR.
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    chained = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=7),
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[12, 20], gamma=0.5)])
    ours = LRSchedule(0.1, steps=(0, 12, 20), gamma=0.5, warmup_iters=7, warmup_factor=0.25)
    for it in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(ours(it), rel=1e-9), it
        opt.step()
        chained.step()


# --- scheduler ------------------------------------------------------------------------------------------------------
def _toy_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False),
                         nn.Flatten(), nn.Linear(2, 3))


def test_scheduler_sets_group_lrs_with_factors_and_round_trips_weights_only():
    model = _toy_model()
    opt = build_optimizer(model, base_lr=0.1, bias_lr_factor=2.0)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 3), gamma=0.1, warmup_iters=2, warmup_factor=0.5))
    seen = []
    for _ in range(5):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    expected = [lr_at(i, 0.1, steps=[0, 3], warmup_iters=2, warmup_factor=0.5) for i in range(5)]
    for lrs, e in zip(seen, expected):
        assert lrs["weights"] == pytest.approx(e)
        assert lrs["biases"] == pytest.approx(2 * e)
        assert lrs["norms"] == pytest.approx(e)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = build_optimizer(model, base_lr=0.1)
    sched2 = WarmupMultiStepLR(opt2, LRSchedule(0.1, steps=(0, 3), gamma=0.1, warmup_iters=2, warmup_factor=0.5))
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(5, 0.1, steps=[0, 3]))


def test_resumed_scheduler_follows_the_new_config(caplog):
    model = _toy_model()
    opt = build_optimizer(model, base_lr=0.1)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 3)))
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, base_lr=0.1)
    sched2 = WarmupMultiStepLR(opt2, LRSchedule(0.1, steps=(0, 10)))
    with caplog.at_level("WARNING"):
        sched2.load_state_dict(sched.state_dict())
    assert "differs from the config" in caplog.text
    assert sched2.last_epoch == 4
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)  # step moved to 10: no decay yet at 4


# --- optimizer --------------------------------------------------------------------------------------------------
def test_param_groups_double_bias_lr_and_no_decay_on_biases_and_norms():
    model = _toy_model()
    model[0].weight.requires_grad_(False)  # frozen: never in the optimizer
    opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, bias_lr_factor=2.0,
                          bias_weight_decay=False, weight_decay_norm=0.0)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["weights"] == {id(model[3].weight), id(model[5].weight)}
    assert ids["biases"] == {id(model[0].bias), id(model[5].bias)}
    assert ids["norms"] == {id(model[1].weight), id(model[1].bias), id(model[2].weight), id(model[2].bias)}
    assert groups["weights"]["lr"] == pytest.approx(0.01) and groups["weights"]["weight_decay"] == 1e-4
    assert groups["biases"]["lr"] == pytest.approx(0.02) and groups["biases"]["weight_decay"] == 0.0
    assert groups["norms"]["lr"] == pytest.approx(0.01) and groups["norms"]["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)


def test_optimizer_from_cfg_reads_solver_keys():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.05
    cfg.SOLVER.BIAS_DOUBLE_LR = False
    cfg.SOLVER.BIAS_WEIGHT_DECAY = True
    cfg.SOLVER.WEIGHT_DECAY = 0.001
    cfg.SOLVER.WEIGHT_DECAY_GN = 0.0005
    opt = build_optimizer_from_cfg(_toy_model(), cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["biases"]["lr"] == pytest.approx(0.05) and groups["biases"]["weight_decay"] == 0.001
    assert groups["norms"]["weight_decay"] == 0.0005
    sched = build_lr_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 3)  # linear warm-up from 1/3
    assert sched.steps == [0, 30000, 40000]


def test_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base_lr"):
        build_optimizer(_toy_model(), base_lr=0.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, base_lr=0.1)


# --- linear scaling rule ----------------------------------------------------------------------------------------------
def _detectron_cfg():
    cfg = get_cfg()
    cfg.NUM_GPUS = 8
    cfg.TRAIN.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.MAX_ITER = 90000
    cfg.SOLVER.STEPS = [0, 60000, 80000]
    cfg.SOLVER.WARM_UP_ITERS = 500
    return cfg


def test_scaling_rule_for_a_smaller_batch():
    cfg = _detectron_cfg()
    messages = []
    info = scale_schedule(cfg, total_batch=4, log=messages.append)
    assert info["changed"] and info["ratio"] == 0.25
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.005)
    assert cfg.SOLVER.MAX_ITER == 360000
    assert list(cfg.SOLVER.STEPS) == [0, 240000, 320000]
    assert cfg.SOLVER.WARM_UP_ITERS == 2000
    assert "0.02 -> 0.005" in messages[0] and "90000 -> 360000" in messages[0]


def test_scaling_rule_for_a_larger_batch_and_explicit_config_batch():
    cfg = get_cfg()
    cfg.TRAIN.IMS_PER_BATCH = 8  # already overridden per process; the file said 2 on 1 GPU
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 1000
    cfg.SOLVER.STEPS = [0, 500]
    cfg.SOLVER.WARM_UP_ITERS = 100
    scale_schedule(cfg, total_batch=16, config_batch=2, log=lambda m: None)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.08)
    # Halves round up, as in Detectron.pytorch.
    assert (cfg.SOLVER.MAX_ITER, list(cfg.SOLVER.STEPS), cfg.SOLVER.WARM_UP_ITERS) == (125, [0, 63], 13)


def test_scaling_rule_off_or_same_batch_changes_nothing():
    cfg = _detectron_cfg()
    assert not scale_schedule(cfg, total_batch=16, log=lambda m: None)["changed"]
    cfg.SOLVER.SCALE_WITH_BATCH = False
    msgs = []
    assert not scale_schedule(cfg, total_batch=4, log=msgs.append)["changed"]
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.MAX_ITER == 90000
    assert "SCALE_WITH_BATCH is False" in msgs[0]


def test_scaling_rule_needs_an_unfrozen_cfg():
    cfg = _detectron_cfg()
    cfg.freeze()
    with pytest.raises(ValueError, match="frozen"):
        scale_schedule(cfg, total_batch=4)


# --- cosine decay, AdamW, weight-decay keys, the rule in the log ------------------------------------------------------
def test_cosine_decay_matches_torch_cosine_annealing_after_the_warmup():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.001)
    ours = LRSchedule(0.1, policy="cosine_decay", max_iter=50, base_lr_end=0.001, warmup_iters=0)
    for it in range(50):
        assert opt.param_groups[0]["lr"] == pytest.approx(ours(it), rel=1e-9), it
        opt.step()
        cos.step()
    assert ours(50) == pytest.approx(0.001) and ours(80) == pytest.approx(0.001)  # flat at the end


def test_cosine_decay_with_linear_warmup_values():
    kw = dict(base_lr=0.02, policy="cosine_decay", max_iter=100, warmup_iters=10, warmup_factor=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.02 * 0.1 * 1.0)  # cos(0) = 1
    assert lr_at(5, **kw) == pytest.approx(0.02 * (0.5 * (1 + math.cos(math.pi * 0.05))) * (0.1 * 0.5 + 0.5))
    assert lr_at(50, **kw) == pytest.approx(0.01)
    assert lr_at(99, **kw) < 1e-4
    with pytest.raises(ValueError, match="max_iter"):
        lr_at(0, 0.1, policy="cosine_decay")
    with pytest.raises(ValueError, match="base_lr_end"):
        LRSchedule(0.1, policy="cosine_decay", max_iter=10, base_lr_end=0.2)


def test_cosine_scheduler_from_cfg_and_resume_round_trip():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.LR_POLICY", "cosine_decay", "SOLVER.BASE_LR", 0.1, "SOLVER.MAX_ITER", 20,
                         "SOLVER.WARM_UP_ITERS", 0, "SOLVER.BASE_LR_END", 0.01])
    model = _toy_model()
    opt = build_optimizer_from_cfg(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = build_optimizer_from_cfg(model, cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 7 / 20)))


def test_adamw_with_groups_and_detectron2_weight_decay_keys():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", 1e-3, "SOLVER.WEIGHT_DECAY", 0.05,
                         "SOLVER.ADAM_BETAS", "[0.9, 0.99]", "SOLVER.WEIGHT_DECAY_NORM", 0.0,
                         "SOLVER.WEIGHT_DECAY_BIAS", 0.0, "SOLVER.BIAS_DOUBLE_LR", False])
    opt = build_optimizer_from_cfg(_toy_model(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["weights"]["weight_decay"] == 0.05 and groups["weights"]["betas"] == (0.9, 0.99)
    assert groups["biases"]["weight_decay"] == 0.0 and groups["norms"]["weight_decay"] == 0.0
    assert groups["biases"]["lr"] == pytest.approx(1e-3)
    # Decay on norms and biases when asked; < 0 falls back to Detectron's keys.
    cfg.merge_from_list(["SOLVER.WEIGHT_DECAY_NORM", 0.01, "SOLVER.WEIGHT_DECAY_BIAS", 0.02])
    groups = {g["name"]: g for g in build_optimizer_from_cfg(_toy_model(), cfg).param_groups}
    assert groups["norms"]["weight_decay"] == 0.01 and groups["biases"]["weight_decay"] == 0.02
    cfg.merge_from_list(["SOLVER.WEIGHT_DECAY_NORM", -1.0, "SOLVER.WEIGHT_DECAY_GN", 0.003,
                         "SOLVER.WEIGHT_DECAY_BIAS", -1.0, "SOLVER.BIAS_WEIGHT_DECAY", True])
    groups = {g["name"]: g for g in build_optimizer_from_cfg(_toy_model(), cfg).param_groups}
    assert groups["norms"]["weight_decay"] == 0.003 and groups["biases"]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(_toy_model(), base_lr=0.1, optimizer="Adam")


def test_adamw_decay_is_decoupled_from_the_gradient():
    # A parameter with zero gradient under AdamW shrinks by lr * wd exactly (torch's decoupled decay).
    p = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        p.weight.fill_(1.0)
    opt = build_optimizer(p, base_lr=0.1, weight_decay=0.5, optimizer="AdamW")
    p.weight.grad = torch.zeros_like(p.weight)
    opt.step()
    torch.testing.assert_close(p.weight, torch.full((2, 2), 1.0 - 0.1 * 0.5))


def test_solver_description_states_the_rule_and_the_schedule():
    from maskrcnn.engine.solver import describe_solver
    cfg = _detectron_cfg()
    msgs = []
    info = scale_schedule(cfg, total_batch=16, log=msgs.append)
    assert "equals the config's (16)" in msgs[0] and "lr proportional to the total batch" in msgs[0]
    assert info["message"] == msgs[0]
    cfg.SOLVER.LR_POLICY = "cosine_decay"
    cfg.SOLVER.BASE_LR_END = 0.001
    scale_schedule(cfg, total_batch=8, log=msgs.append)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.01) and cfg.SOLVER.BASE_LR_END == pytest.approx(0.0005)
    line = describe_solver(cfg, build_optimizer_from_cfg(_toy_model(), cfg), total_batch=8)
    assert "SGD (momentum 0.9)" in line and "BASE_LR 0.01 for a total batch of 8 images" in line
    assert "cosine_decay to 0.0005 at iteration 180000" in line and "linear warm-up over 1000" in line
