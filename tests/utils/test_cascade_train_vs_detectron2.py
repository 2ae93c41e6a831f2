"""Cascade R-CNN training (``CascadeROIHeads.cascade_losses``) proven on detectron2's own losses and gradients
(tests/fixtures/detectron2/ref_cascade_train.npz, made by make_reference_cascade_train.py with detectron2 02b5c4e).

Same seeded weights (through the detectron2 converter), FPN features, proposals and ground truth as detectron2;
stage 0 keeps every proposal (``TRAIN.BATCH_SIZE_PER_IM`` 100000) so the random sampling cannot differ, and the
box loss is detectron2's L1 (``FAST_RCNN.SMOOTH_L1_BETA`` 0). Checked: each stage's ``loss_cls`` / ``loss_bbox``
(stages 1, 2 label the previous stage's detached, clipped, non-empty regressed boxes at IoU 0.6 / 0.7 with their own
box coders), the gradient into every FPN level (each stage's scaled by 1/3), and each stage's weight gradients.
"""
import os
import sys

import numpy as np
import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.checkpoint import load_ckpt
from tests.utils.test_converters_vs_detectron2 import FIXTURES, REPO, seeded

sys.path.insert(0, FIXTURES)
import make_reference_cascade_train as ref_inputs  # noqa: E402


pytestmark = [pytest.mark.slow]  # ~35 s: a seeded R-50-FPN state dict goes through the converter


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIXTURES, "ref_cascade_train.npz"))


def _model(tmp_path) -> Generalized_RCNN:
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", "cascade_mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["OPS_BACKEND", "torchvision", "MODEL.MASK_ON", False, "TRAIN.BATCH_SIZE_PER_IM", 100000,
                         "FAST_RCNN.SMOOTH_L1_BETA", 0.0])
    model = Generalized_RCNN(cfg)
    state = seeded.seeded_state_dict(seeded.load_names(seeded.CASCADE_MODEL))
    state = {k: v for k, v in state.items() if not k.startswith("roi_heads.mask_head.")}
    path = os.path.join(tmp_path, "model_final.pth")
    torch.save({"model": state, "__author__": "seeded test"}, path)
    load_ckpt(model, path)
    return model.train()


def test_cascade_losses_and_gradients_match_detectron2(tmp_path, ref):
    model = _model(tmp_path)
    feats = [f.requires_grad_(True) for f in ref_inputs.features()]
    props, gts, classes = ref_inputs.inputs()
    targets = [{"boxes": b, "labels": c + 1} for b, c in zip(gts, classes)]  # ours: 0 is background
    _, losses = model.roi_heads(feats, props, list(ref_inputs.SIZES), targets)
    assert sorted(losses) == sorted(f"loss_{n}_stage{k}" for n in ("cls", "bbox") for k in range(3))
    sum(losses.values()).backward()

    figures = []
    for k in range(3):
        for ours, theirs in (("cls", "cls"), ("bbox", "box_reg")):
            a, b = losses[f"loss_{ours}_stage{k}"].detach(), torch.from_numpy(ref[f"loss_{theirs}_stage{k}"])
            figures.append(f"{ours}{k} {float(a):.5f} (diff {abs(float(a) - float(b)):.1e})")
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    grads = [f.grad if f.grad is not None else torch.zeros_like(f) for f in feats]
    ours = ref_inputs.grad_summary(grads)
    np.testing.assert_allclose(ours["grad_abs_sum"], ref["grad_abs_sum"], rtol=1e-4, atol=1e-9)
    flat = torch.cat([g.flatten() for g in grads])
    top = torch.from_numpy(ref["grad_top_val"])
    grad_diff = (flat[torch.from_numpy(ref["grad_top_idx"])] - top).abs().max()
    torch.testing.assert_close(flat[torch.from_numpy(ref["grad_top_idx"])], top, rtol=1e-4, atol=1e-4 * top.abs().max())
    rh = model.roi_heads
    w_diff = 0.0
    for k in range(3):
        g_ref = torch.from_numpy(ref[f"stage{k}_bbox_pred_grad"])
        g = rh.Box_Outs[k].bbox_pred.weight.grad[4:]  # ours: a zero background box first
        w_diff = max(w_diff, float((g - g_ref).abs().max() / g_ref.abs().max()))
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max())
        fc6_ref = torch.from_numpy(ref[f"stage{k}_fc1_grad_norm"])  # detectron2's fc1 is our fc6
        torch.testing.assert_close(rh.Box_Head[k].fc6.weight.grad.norm(), fc6_ref, rtol=1e-4, atol=0)
    print("cascade training vs detectron2: losses " + ", ".join(figures)
          + f"; feature gradient (top {len(top)}) max |diff| {grad_diff:.1e} (max |grad| {top.abs().max():.1e}); "
          f"bbox_pred weight gradient max relative diff {w_diff:.1e}")
