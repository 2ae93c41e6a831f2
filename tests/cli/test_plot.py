"""maskrcnn-plot (maskrcnn/cli/plot.py): one run into its folder, several runs on one figure, and the exit status of
each failure."""
import json
import sys

import pytest

from maskrcnn.cli import plot


def _run_dir(path, losses, aps=()):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"type": "train", "iteration": 10 * i, "total_loss": loss, "loss_cls": loss / 2,
                                "lr": 0.01}) + "\n")
        for it, ap in aps:
            f.write(json.dumps({"type": "eval", "iteration": it, "bbox/AP": ap, "segm/AP": ap - 1}) + "\n")
    return str(path)


def test_one_run_goes_into_its_folder_and_several_into_one_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the optional plot extra (pinned in requirements-dev.txt)")
    a = _run_dir(tmp_path / "a", [3.0, 2.0, 1.5], aps=[(20, 10.0), (30, 12.5)])
    b = _run_dir(tmp_path / "b", [3.5, 2.5])
    assert plot.main([a]) == 0
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0
    assert "1 run(s), 2 loss and 2 AP curve(s) (4 evaluation points)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert plot.main([a, str(tmp_path / "b" / "metrics.jsonl")]) == 0  # a folder or its metrics.jsonl
    assert (tmp_path / "curves.png").exists()
    assert "2 run(s), 2 loss and 2 AP curve(s)" in capsys.readouterr().out
    assert plot.main([a, b, "-o", str(tmp_path / "cmp" / "c.png"), "--title", "a vs b"]) == 0
    assert (tmp_path / "cmp" / "c.png").exists()


def test_failures_exit_with_a_message(tmp_path, capsys, monkeypatch):
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot.main([str(empty)]) == 2
    assert "no training records in empty" in capsys.readouterr().err
    ok = _run_dir(tmp_path / "ok", [1.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot.main([ok]) == 1
    assert "needs matplotlib" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([])  # at least one OUTPUT_DIR
