"""maskrcnn.utils.curves on its own: run labels, the series drawn from metrics.jsonl records, the PNG, and the
error without matplotlib."""
import struct
import sys

import pytest

from maskrcnn.utils.curves import PlotUnavailable, curve_data, plot_curves, run_labels


def _records(scale: float, with_eval: bool = True):
    recs = []
    for it in (20, 40, 60):
        recs.append({"type": "train", "iteration": it, "total_loss": scale * 3.0 / it, "loss_cls": scale / it,
                     "loss_mask": 2 * scale / it, "lr": 0.01 * it / 60, "time": 0.3, "grad_norm": 1.0})
        if with_eval and it % 40 == 20:
            recs.append({"type": "eval", "iteration": it, "bbox/AP": it / 2, "segm/AP": it / 3, "bbox/AP50": 90.0,
                         "segm/AP-ellipse": 1.0, "eval_time": 2.0})
    recs.append({"type": "train", "iteration": 80, "total_loss": None, "lr": 0.01})  # NaN loss: left out
    return recs


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_run_labels_are_folder_names_made_distinct(tmp_path):
    (tmp_path / "a" / "out").mkdir(parents=True)
    (tmp_path / "b" / "out").mkdir(parents=True)
    (tmp_path / "a" / "out" / "metrics.jsonl").write_text("")
    assert run_labels([str(tmp_path / "a"), str(tmp_path / "b")]) == ["a", "b"]
    assert run_labels([str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")]) == ["a/out", "b/out"]
    assert run_labels([str(tmp_path / "a" / "out" / "metrics.jsonl")]) == ["out"]  # a file: its folder


def test_curve_data_of_one_run_has_every_loss_and_each_ap():
    data = curve_data([("run", _records(1.0))])
    assert sorted(data["loss"]) == ["loss_cls", "loss_mask", "total_loss"]
    assert data["loss"]["total_loss"] == ([20, 40, 60], [0.15, 0.075, 0.05])
    assert data["AP"] == {"bbox/AP": ([20, 60], [10.0, 30.0]), "segm/AP": ([20, 60], [20 / 3, 20.0])}
    assert data["lr"]["lr"][0] == [20, 40, 60, 80]


def test_curve_data_of_several_runs_compares_totals_and_aps_by_run():
    data = curve_data([("sgd", _records(1.0)), ("adamw", _records(2.0, with_eval=False))])
    assert sorted(data["loss"]) == ["adamw: total_loss", "sgd: total_loss"]
    assert data["loss"]["adamw: total_loss"][1] == [0.3, 0.15, 0.1]
    assert sorted(data["AP"]) == ["sgd: bbox/AP", "sgd: segm/AP"]
    assert sorted(data["lr"]) == ["adamw: lr", "sgd: lr"]


def test_plot_curves_writes_a_png_of_the_figure_size(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional plot extra (pinned in requirements-dev.txt)")
    out = tmp_path / "sub" / "curves.png"
    data = plot_curves([("a", _records(1.0)), ("b", _records(2.0))], str(out), title="two runs", dpi=50)
    assert _png_size(out) == (750, 225)  # 15 x 4.5 inches at 50 dpi
    assert len(data["loss"]) == 2 and len(data["AP"]) == 4
    # A run without evaluations still plots (the AP panel says why it is empty).
    plot_curves([("a", _records(1.0, with_eval=False))], str(tmp_path / "noeval.png"), dpi=20)
    assert _png_size(tmp_path / "noeval.png") == (300, 90)


def test_plot_curves_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no runs given"):
        plot_curves([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"no training records in empty \(nothing logged yet\?\)"):
        plot_curves([("empty", [{"type": "eval", "iteration": 2, "bbox/AP": 1.0}])], str(tmp_path / "x.png"))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    with pytest.raises(PlotUnavailable, match=r"needs matplotlib.*pip install 'maskrcnn\[plot\]'"):
        plot_curves([("a", _records(1.0))], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
