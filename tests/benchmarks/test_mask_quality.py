"""benchmarks/mask_quality.py: the per-instance rows (ceilings, box IoU, predicted mask) and the CLI."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import mask_quality  # noqa: E402

from maskrcnn.cli.auto import load_auto_cfg  # noqa: E402
from maskrcnn.data.datasets.synthetic_family import SyntheticFamilyDataset  # noqa: E402
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN  # noqa: E402


def _checkpoint(tmp_path):
    cfg = load_auto_cfg(None)
    cfg.MODEL.NUM_CLASSES = 4
    cfg.TRAIN.SCALES, cfg.TEST.SCALE, cfg.TRAIN.MAX_SIZE, cfg.TEST.MAX_SIZE = [128], 128, 128, 128
    cfg.TEST.MASK_PASTE_METHOD = "detectron2"
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg).eval()
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "cfg": cfg.dump()}, path)
    return path


def test_rows_bound_each_other_and_the_cli_prints_every_class(tmp_path, capsys):
    from maskrcnn.predictor import Predictor

    ckpt = _checkpoint(tmp_path)
    data = SyntheticFamilyDataset("basic", "val", num_images=3)
    rows = mask_quality.measure(Predictor(None, str(ckpt), device="cpu"), data, 3)
    n = sum(int((data[i][1]["iscrowd"] == 0).sum()) for i in range(3))
    assert sum(len(v) for v in rows.values()) == n > 0
    for label, values in rows.items():
        assert label in (1, 2, 3)
        for ceiling, box, at_pred, pred in values:
            # basic's filled rectangles, ellipses and triangles survive a 28x28 cut almost whole
            assert 0.8 < ceiling <= 1.0
            assert 0.0 <= box <= 1.0 and 0.0 <= at_pred <= 1.0 and 0.0 <= pred <= 1.0
    assert mask_quality.main(["--load_ckpt", str(ckpt), "--dataset", "synthetic:basic:val", "--images", "2"]) == 0
    out = capsys.readouterr().out
    assert "oracle@gt" in out and len(out.strip().splitlines()) >= 2
