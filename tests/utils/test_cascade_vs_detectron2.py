"""Cascade Mask R-CNN (``MODEL.CASCADE_ON``, maskrcnn/modeling/roi_heads/cascade.py) and the detectron2 converter's
cascade names, proven on detectron2's own outputs (tests/fixtures/detectron2/ref_cascade_R_50_FPN.npz, made by
make_reference_cascade.py with detectron2 02b5c4e from Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml): the seeded
checkpoint, keyed by detectron2's names (``roi_heads.box_head.{k}``, ``roi_heads.box_predictor.{k}``), is written
as a detectron2 .pth, loaded through ``load_ckpt`` into our model built from
configs/detectron2/cascade_mask_rcnn_R_50_FPN_3x.yaml, and must compute what detectron2 computed:

* every stage's class logits and class-agnostic box deltas for fixed RoIs;
* end to end from the photos: input pixels, top-50 proposals, all final detections (stage-averaged scores, last
  stage's boxes; same order and classes), mask probabilities of the best 20 and pasted masks of the best 5.

``pytest tests/utils/test_cascade_vs_detectron2.py -s`` prints the figures (docs/model_zoo.md lists them).
"""
import os

import numpy as np
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.roi_heads import CascadeROIHeads
from maskrcnn.utils.checkpoint import load_ckpt
from tests.utils.test_converters_vs_detectron2 import (DATA, FIXTURES, REPO, _detectron2_batch,
                                                       check_outputs_against_detectron2, seeded)

pytestmark = [pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data (real photos) not present")]
ARCH = seeded.CASCADE_MODEL


def _model(tmp_path) -> Generalized_RCNN:
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", "cascade_mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["OPS_BACKEND", "torchvision", "TEST.SCALE", seeded.MIN_SIZE_TEST,
                         "TEST.MAX_SIZE", seeded.MAX_SIZE_TEST])
    model = Generalized_RCNN(cfg).eval()
    path = os.path.join(tmp_path, "model_final.pth")
    torch.save({"model": seeded.seeded_state_dict(seeded.load_names(ARCH)), "__author__": "seeded test"}, path)
    load_ckpt(model, path)
    return model


@torch.no_grad()
def test_every_stage_box_head_matches_detectron2(tmp_path):
    ref = np.load(os.path.join(FIXTURES, f"ref_{ARCH}.npz"))
    model = _model(tmp_path)
    assert isinstance(model.roi_heads, CascadeROIHeads) and model.roi_heads.num_stages == 3
    batch = _detectron2_batch(ref, ARCH, model.preprocess.pixel_mean.view(3, 1, 1))
    feats = [model.Conv_Body(batch[i: i + 1]) for i in range(len(seeded.PHOTOS))]
    figures = []
    for k in range(3):
        cls, reg = [], []
        for i, f in enumerate(feats):
            c, r = model.Box_Outs[k](model.Box_Head[k](f, [torch.from_numpy(ref[f"im{i}_rois"])]))
            cls.append(c)
            reg.append(r)
        cls, reg = torch.cat(cls), torch.cat(reg)
        ref_cls = torch.from_numpy(ref[f"stage{k}_cls_logits"])
        ref_cls = torch.cat([ref_cls[:, -1:], ref_cls[:, :-1]], 1)  # detectron2: background last; ours: first
        ref_reg = torch.from_numpy(ref[f"stage{k}_bbox_deltas"])
        assert cls.shape == ref_cls.shape == (40, 81) and reg.shape == (40, 8) and ref_reg.shape == (40, 4)
        figures.append(f"stage {k}: max |cls logit diff| {(cls - ref_cls).abs().max():.2e}, "
                       f"max |delta diff| {(reg[:, 4:] - ref_reg).abs().max():.2e}")
        torch.testing.assert_close(cls, ref_cls, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(reg[:, 4:], ref_reg, rtol=1e-3, atol=1e-3)
    print("cascade box heads vs detectron2: " + "; ".join(figures))


def test_outputs_match_detectron2(tmp_path):
    print(f"detectron2 {ARCH} vs detectron2: " + check_outputs_against_detectron2(_model(tmp_path), ARCH))
