"""The checking and ratio pieces of benchmarks/common.py, on tiny hand-made detections (no timing, no model)."""
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import common  # noqa: E402


def _dets(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1)
    return {"boxes": boxes, "labels": torch.tensor([1, 2, 1, 3][:n]),
            "scores": torch.tensor([0.9, 0.7, 0.5, 0.3][:n]), "masks": torch.rand(n, 1, 32, 32, generator=g)}


def _copy(d):
    return {k: v.clone() for k, v in d.items()}


def test_identical_on_equal_and_within_tolerance():
    a = _dets()
    b = _copy(a)
    b["boxes"] += 0.5 * common.BOX_TOL
    b["scores"] -= 0.5 * common.SCORE_TOL
    b["masks"] += 0.5 * common.MASK_TOL
    c = common.compare_detections(a, b)
    assert c["identical"] and c["in_same_order"]
    assert common.require_identical({"x": c}) == []


@pytest.mark.parametrize("key,delta", [("boxes", 2 * common.BOX_TOL), ("scores", 2 * common.SCORE_TOL),
                                       ("masks", 2 * common.MASK_TOL)])
def test_perturbed_output_fails(key, delta, capsys):
    a = _dets()
    b = _copy(a)
    b[key][1] += delta  # one detection only
    c = common.compare_detections(a, b)
    assert not c["identical"]
    assert common.require_identical({"ours": c}) == ["ours"]
    assert "IDENTICAL-DETECTIONS CHECK FAILED for ours" in capsys.readouterr().err


def test_swapped_order_fails_even_when_every_detection_pairs():
    a = _dets()
    order = torch.tensor([1, 0, 2, 3])
    b = {k: v[order] for k, v in a.items()}
    c = common.compare_detections(a, b)
    assert c["paired"] == 4 and not c["in_same_order"] and not c["identical"]


def test_missing_or_relabelled_detection_fails():
    a = _dets()
    b = {k: v[:3] for k, v in a.items()}
    assert not common.compare_detections(a, b)["identical"]
    b = _copy(a)
    b["labels"][2] = 7
    assert not common.compare_detections(a, b)["identical"]
    empty = {k: v[:0] for k, v in a.items()}
    assert common.compare_detections(empty, _copy(empty))["identical"]


def test_fair_ratios():
    med = {common.TV_PLAIN: 4.0, common.TV_CL: 3.2, common.TV_BF16: 8.0, "ours-fp32": 2.4, "ours-bf16": 2.0}
    r = common.fair_ratios(med, "ours-fp32", "ours-bf16")
    assert r[f"ours-fp32 / {common.TV_PLAIN}"] == pytest.approx(0.6)
    assert r[f"ours-fp32 / best fp32 ({common.TV_CL})"] == pytest.approx(0.75)
    assert r[f"ours-bf16 / {common.TV_PLAIN}"] == pytest.approx(0.5)
    assert r[f"ours-bf16 / {common.TV_BF16}"] == pytest.approx(0.25)
    med[common.TV_CL] = 5.0  # channels-last slower: plain is torchvision's best fp32
    assert common.fair_ratios(med, "ours-fp32", None) == {
        f"ours-fp32 / {common.TV_PLAIN}": pytest.approx(0.6),
        f"ours-fp32 / best fp32 ({common.TV_PLAIN})": pytest.approx(0.6)}
    # A bf16-only run (train_step.py --runs, the emulated bf16 timed apart): only the bf16 ratio exists.
    assert common.fair_ratios({common.TV_BF16: 8.0, "ours-bf16": 2.0}, "ours-fp32", "ours-bf16") == {
        f"ours-bf16 / {common.TV_BF16}": pytest.approx(0.25)}


def test_fair_ratios_int8():
    med = {common.TV_PLAIN: 4.0, common.TV_CL: 3.2, common.TV_BF16: 2.0, "ours-fp32": 2.4, "ours-int8": 0.8}
    r = common.fair_ratios(med, "ours-fp32", None, "ours-int8")
    assert r[f"ours-int8 / {common.TV_BF16}"] == pytest.approx(0.4)
    assert r[f"ours-int8 / best fp32 ({common.TV_CL})"] == pytest.approx(0.25)
    assert r["ours-int8 / ours-fp32"] == pytest.approx(1 / 3)
    assert "ours-int8 / ours-fp32" not in common.fair_ratios({common.TV_BF16: 2.0, "ours-int8": 1.0}, "ours-fp32",
                                                             None, "ours-int8")


def test_plot_measures_goal_ratios_with_per_round_spread():
    import plot

    def row(name, times, key="score>=0"):
        return {"model": f"{name} @{key}", "median_s": common.median(times), "times_s": times}

    inference = {"benchmark": "inference", "sets": ["score>=0"], "rows": [
        row(common.TV_PLAIN, [4.0, 4.0, 4.0]), row(common.TV_CL, [2.0, 4.0, 3.0]), row(common.TV_BF16, [2.0, 2.0, 2.0]),
        row("ours-fp32", [1.0, 2.0, 1.5]), row("ours-int8", [0.4, 0.6, 0.5]),
        row("ours-fp32", [9.0, 9.0, 9.0], key="trained,score>=0.05")]}
    train = {"benchmark": "train_step", "rows": [
        {"model": common.TV_PLAIN, "median_s": 3.0, "times_s": [3.0, 3.0]},
        {"model": common.TV_CL, "median_s": 4.0, "times_s": [4.0, 4.0]},
        {"model": "ours-fp32", "median_s": 1.5, "times_s": [1.2, 1.8]}]}
    got = {m["label"]: m for m in plot.measured({"inference": inference, "train_step": train})}
    assert set(got) == {"inference fp32", "inference int8", "training fp32"}
    fp32 = got["inference fp32"]
    assert fp32["competitor"] == common.TV_CL  # torchvision's faster fp32 setting (median 3.0 < 4.0)
    assert fp32["ratio"] == pytest.approx(0.5) and fp32["spread"] == pytest.approx((0.5, 0.5))
    assert got["inference int8"]["competitor"] == common.TV_BF16
    assert got["inference int8"]["ratio"] == pytest.approx(0.25)
    assert got["inference int8"]["spread"] == pytest.approx((0.2, 0.3))
    assert got["training fp32"]["competitor"] == common.TV_PLAIN
    assert got["training fp32"]["spread"] == pytest.approx((0.4, 0.6))
    ap = {"dataset": "synthetic:val", "ap_difference": {"int8": {"bbox": -0.5}},
          "results": {"fp32": {"metrics": {"bbox": {"AP": 60.0}}}, "int8": {"metrics": {"bbox": {"AP": 59.5}}}}}
    table = plot.markdown({"inference": inference, "train_step": train, "reduced_precision_ap": [ap]})
    assert "| inference int8 (score>=0) |" in table and "<= 0.25" in table
    assert "| int8 bbox AP (synthetic:val) | 59.50 | fp32 60.00 | -0.50 points | - | within 1.0 | - |" in table
    train["goal_lines"] = ["goal ours-fp32 <= 0.60 of torchvision plain (3.000 s): ..."]
    assert plot.markdown({"train_step": train}).endswith("\n\n- goal ours-fp32 <= 0.60 of torchvision plain (3.000 s): ...")


def test_torchvision_settings_run_channels_last_and_bf16():
    conv = nn.Conv2d(3, 4, 3).eval()
    x = torch.rand(1, 3, 8, 8)
    fns = common.torchvision_settings(conv, lambda m: m(x))
    assert set(fns) == set(common.TV_SETTINGS)
    with torch.no_grad():
        plain, cl, bf16 = fns[common.TV_PLAIN](), fns[common.TV_CL](), fns[common.TV_BF16]()
    assert plain.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, plain, rtol=1e-5, atol=1e-5)
    assert conv.weight.is_contiguous()  # the original keeps its layout


def test_git_commit_is_recorded():
    commit = common.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) == 40


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.int8, 6e-2)])
def test_conv_runner_computes_its_convolution(dtype, tol):
    h, w, cin, cout, k = 11, 9, 32, 16, 3
    run, flops = common.conv_runner(dtype, (h, w, cin, cout, k))
    assert flops == 2 * h * w * cin * cout * k * k
    out = run()
    if out.is_quantized:
        out = out.dequantize()
    # The runner's seeded input and weight, regenerated.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    ref = torch.nn.functional.conv2d(x, weight, padding=1)
    if dtype == torch.int8:
        ref = ref.clamp(0, 255 * 0.05)  # the quint8 output (zero point 0, scale 0.05) holds 0 .. 12.75
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_compute_peak_is_the_better_probe(monkeypatch):
    monkeypatch.setattr(common, "matmul_peak", lambda dtype, repeats=3: 100.0)
    monkeypatch.setattr(common, "CONV_PROBE", (8, 8, 8, 8, 3))
    monkeypatch.setattr(common.conv_runner, "__defaults__", (torch.float32, (8, 8, 8, 8, 3)))
    out = common.compute_peak(torch.float32, repeats=1)
    assert out["matmul"] == 100.0 and out["conv"] > 0
    assert out["peak"] == max(out["matmul"], out["conv"])


def test_peak_probes_are_added_beside_the_models_and_popped_as_rates():
    fns = {"model": lambda: None}
    conv_flops = common.add_peak_probes(fns, {"fp32": torch.float32})
    assert set(fns) == {"model", "matmul-fp32", "conv-fp32"} and conv_flops["fp32"] > 0
    times = {"model": [1.0, 2.0], "matmul-fp32": [2.0, 1.0], "conv-fp32": [conv_flops["fp32"] / 300e9, 1.0]}
    peaks = common.pop_peaks(times, conv_flops)
    assert set(times) == {"model"}  # the probes are gone, the models' times stay
    assert peaks["fp32"]["matmul"] == pytest.approx(2.0 * 4096 ** 3 / 1e9)  # the best (shortest) time
    assert peaks["fp32"]["conv"] == pytest.approx(300.0)
    assert peaks["fp32"]["peak"] == pytest.approx(max(300.0, 2.0 * 4096 ** 3 / 1e9))
