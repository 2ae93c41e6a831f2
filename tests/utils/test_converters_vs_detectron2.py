"""Our converters proven on detectron2's own outputs (tests/fixtures/detectron2/, made by make_reference.py with
detectron2 02b5c4e): the seeded checkpoints are regenerated here bit-identically (no detectron2 needed), written in
detectron2's .pth, Detectron's .pkl and Detectron.pytorch's formats, loaded through ``load_ckpt`` into our model with
configs/detectron2/, and the box head's outputs for fixed RoIs on a real photo must equal detectron2's.
"""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.utils.checkpoint import load_ckpt
from maskrcnn.utils.weights.detectron import canonical_to_detectron
from maskrcnn.utils.weights.detectron2 import detectron2_to_canonical
from maskrcnn.utils.weights.detectron_pytorch import canonical_to_detectron_pytorch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "detectron2")
DATA = os.path.join(REPO, "..", "shared", "data", "PennFudanPed-sample", "PNGImages")
sys.path.insert(0, FIXTURES)
import seeded  # noqa: E402

pytestmark = [pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data (real photos) not present")]


def _write(fmt: str, model: str, tmp_path) -> str:
    state = seeded.seeded_state_dict(seeded.load_names(model))
    if fmt == "detectron2":
        path = os.path.join(tmp_path, "model_final.pth")
        torch.save({"model": state, "__author__": "seeded test"}, path)
        return path
    canonical, _ = detectron2_to_canonical({"model": state})
    if fmt == "detectron.pytorch":  # names from our own inverse converter: proves the round trip, not the names
        path = os.path.join(tmp_path, "model_step89999.pth")
        torch.save({"model": canonical_to_detectron_pytorch(canonical), "step": 89999}, path)
    else:  # Detectron .pkl: Detectron's blob names (proven by detectron2's own c2 loader in make_reference.py)
        path = os.path.join(tmp_path, "model_final.pkl")
        with open(path, "wb") as f:
            pickle.dump({"blobs": canonical_to_detectron(canonical)}, f)
    return path


def _resized_bgr(name: str, size) -> torch.Tensor:
    """The photo as detectron2 fed it: BGR float 0..255 at the recorded resized size (PIL bilinear, as its
    ResizeShortestEdge), CHW."""
    rgb = Image.open(os.path.join(DATA, name)).convert("RGB")
    h, w = (int(s) for s in size)
    arr = np.asarray(rgb.resize((w, h), Image.BILINEAR))[:, :, ::-1].copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float()


@pytest.mark.parametrize("arch", ["R_50_FPN", "R_50_C4"])
@pytest.mark.parametrize("fmt", ["detectron2", "detectron", "detectron.pytorch"])
@torch.no_grad()
def test_box_head_outputs_match_detectron2(fmt, arch, tmp_path):
    ref = np.load(os.path.join(FIXTURES, f"ref_{arch}.npz"))
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", f"mask_rcnn_{arch}_3x.yaml"))
    cfg.merge_from_list(["OPS_BACKEND", "torchvision"])
    model = Generalized_RCNN(cfg).eval()
    load_ckpt(model, _write(fmt, arch, tmp_path))
    means = torch.tensor(cfg.PIXEL_MEANS).view(3, 1, 1)
    n = ref["im0_rois"].shape[0]
    cls_all, reg_all = [], []
    # detectron2 ran both photos as one batch, zero-padded (after normalisation) to the largest size, rounded up to
    # the FPN stride 32 (C4: not rounded): convolutions near the border see the padding, so it is rebuilt exactly.
    sizes = [ref[f"im{i}_resized"] for i in range(len(seeded.PHOTOS))]
    div = 32 if arch.endswith("FPN") else 1
    ph, pw = ((max(int(s[d]) for s in sizes) + div - 1) // div * div for d in (0, 1))
    for i, name in enumerate(seeded.PHOTOS):
        x = (_resized_bgr(name, ref[f"im{i}_resized"]) - means)
        h, w = x.shape[1:]
        pad = torch.zeros(3, ph, pw)
        pad[:, :h, :w] = x
        feats = model.Conv_Body(pad[None])
        cls, reg = model.Box_Outs(model.Box_Head(feats, [torch.from_numpy(ref[f"im{i}_rois"])]))
        cls_all.append(cls)
        reg_all.append(reg)
    cls, reg = torch.cat(cls_all), torch.cat(reg_all)
    ref_cls = torch.from_numpy(ref["roi_cls_logits"])
    ref_cls = torch.cat([ref_cls[:, -1:], ref_cls[:, :-1]], 1)  # detectron2: background last; ours: first
    ref_reg = torch.from_numpy(ref["roi_bbox_deltas"])
    assert cls.shape == ref_cls.shape == (2 * n, 81)
    cls_diff = (cls - ref_cls).abs().max().item()
    reg_diff = (reg[:, 4:] - ref_reg).abs().max().item()
    print(f"{fmt} {arch} box head vs detectron2: max |cls logit diff| {cls_diff:.2e}, "
          f"max |delta diff| {reg_diff:.2e}")
    torch.testing.assert_close(cls, ref_cls, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(reg[:, 4:], ref_reg, rtol=1e-3, atol=1e-3)
