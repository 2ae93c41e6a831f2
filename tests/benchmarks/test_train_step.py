"""benchmarks/train_step.py: the FLOP count of a training step and the goal lines."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import common  # noqa: E402
import train_step  # noqa: E402


def test_goal_lines_give_the_step_and_the_fraction_of_the_peak_a_goal_needs():
    medians = {common.TV_PLAIN: 12.0, common.TV_CL: 10.0, "ours-fp32": 5.9, common.TV_BF16: 8.0, "ours-bf16": 5.0}
    flops = {"torchvision": 2.0e12, "ours": 2.0e12}
    peaks = {"fp32": {"peak": 200.0}, "bf16": {"peak": 400.0}}
    fp32, bf16 = train_step.goal_lines(medians, flops, peaks)
    # fp32: 0.60 of the faster torchvision fp32 setting (channels-last, 10 s) is 6 s: 2000 GFLOP / 6 s = 333.
    assert "of torchvision channels-last (10.000 s): a step of 6.000 s, 333 GFLOP/s" in fp32
    assert "167% of the fp32 peak (200)" in fp32 and fp32.endswith("measured 0.590")
    # bf16: 0.45 of 8 s is 3.6 s: 556 GFLOP/s, 139% of 400.
    assert "a step of 3.600 s, 556 GFLOP/s" in bf16 and "139% of the bf16 peak (400)" in bf16
    assert bf16.endswith("measured 0.625")
    # A goal whose runs, count or peak are missing is left out.
    assert train_step.goal_lines({"ours-fp32": 1.0, common.TV_CL: 2.0}, flops, {"bf16": {"peak": 1.0}}) == []
    assert train_step.goal_lines(medians, {}, peaks) == []


@pytest.mark.slow
def test_both_models_do_the_same_work_per_training_step():
    # The rates of the table divide each model's own count; at the same config (2000 proposals, 512 RoIs per image,
    # the mask head on the positives) ours and torchvision's count the same convolutions and matmuls.
    flops = train_step.count_step_flops(["torchvision", "ours-fp32"], (160, 224))
    assert set(flops) == {"torchvision", "ours"}
    assert flops["torchvision"] > 1e10
    assert flops["ours"] == pytest.approx(flops["torchvision"], rel=1e-3)
