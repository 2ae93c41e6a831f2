"""benchmarks/trained.py's data in torchvision's conventions (no training, no model)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import trained  # noqa: E402


def test_synthetic_images_are_torchvision_targets():
    (image, target), = trained.synthetic_images("val", [0])
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.5
    n = len(target["labels"])
    assert n >= 1 and target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 128, 128)
    assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
    b = target["boxes"]
    assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
    # Each box encloses its mask (x1y1x2y2 pixels).
    for box, mask in zip(b, target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert float(xs.min()) >= float(box[0]) - 1 and float(xs.max()) <= float(box[2])
        assert float(ys.min()) >= float(box[1]) - 1 and float(ys.max()) <= float(box[3])


def test_ours_checkpoint_keeps_the_synthetic_classes(tmp_path):
    # A torchvision model (untrained here) written as our 4-class checkpoint: the kept predictor rows are
    # torchvision's rows 0..3, and the written config + checkpoint load back into a model that gives the same
    # class-1..3 scores as the 91-class model restricted to those classes.
    import common
    from maskrcnn.config import get_cfg
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt

    tv = common.build_torchvision(size=trained.TRAINED_SIZE)
    cfg_path, ckpt_path = trained.ours_checkpoint(tv, str(tmp_path / "out"))
    cfg = get_cfg()
    cfg.merge_from_file(cfg_path)
    assert cfg.MODEL.NUM_CLASSES == trained.SYNTHETIC_CLASSES and list(cfg.TEST.DATASETS) == ["synthetic:val"]
    model = Generalized_RCNN(cfg)
    load_ckpt(model, ckpt_path, allow_class_mismatch=False)
    sd = tv.state_dict()
    torch.testing.assert_close(model.Box_Outs.cls_score.weight, sd["roi_heads.box_predictor.cls_score.weight"][:4])
    torch.testing.assert_close(model.Box_Outs.bbox_pred.bias, sd["roi_heads.box_predictor.bbox_pred.bias"][:16])
    torch.testing.assert_close(model.Mask_Outs.mask_fcn_logits.weight,
                               sd["roi_heads.mask_predictor.mask_fcn_logits.weight"][:4])
