"""Our converters and our model proven on detectron2's own outputs (tests/fixtures/detectron2/, made by
make_reference.py with detectron2 02b5c4e): the seeded checkpoints are regenerated here bit-identically (no
detectron2 needed), written in detectron2's .pth, Detectron's .pkl and Detectron.pytorch's formats, loaded through
``load_ckpt`` into our model with configs/detectron2/, and must compute what detectron2 computed:

* the box head's outputs for fixed RoIs (:func:`test_box_head_outputs_match_detectron2`);
* end to end from the photo (:func:`test_outputs_match_detectron2`): the resized sizes and pixels (PIL's), the
  top-50 proposals and their objectness logits, all final detections (boxes in original-image pixels, scores and
  classes, in the same order), the 28x28 (FPN) / 14x14 (C4) mask probabilities of the best 20 and the pasted binary
  masks of the best 5.

The Detectron .pkl is the file detectron2 itself read for the references (make_reference.py asserts that it gives
detectron2's model the .pth's parameters), so the references hold detectron2's arithmetic: no Detectron "+1" boxes
(MODEL.LEGACY_PLUS_ONE False). Detectron.pytorch files, written by our inverse converter, load bit-identical weights
to the .pkl's (:func:`test_detectron_pytorch_round_trip_loads_the_pkl_weights`), so their outputs are the .pkl's.

Figures: ``pytest tests/utils/test_converters_vs_detectron2.py -s`` prints them; docs/model_zoo.md lists them.
"""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import get_cfg
from maskrcnn.modeling.rpn.proposals import generate_proposals
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


def _detectron2_batch(ref, arch: str, means: torch.Tensor) -> torch.Tensor:
    """The batch detectron2 fed its backbone, rebuilt independently of our pre-processing: both photos resized by
    PIL to the recorded sizes, BGR minus ``means``, zero-padded (after normalisation) to the largest size, rounded
    up to the FPN stride 32 (C4: not rounded). Convolutions near the border see the padding, so it matters."""
    sizes = [ref[f"im{i}_resized"] for i in range(len(seeded.PHOTOS))]
    div = 32 if arch.endswith("FPN") else 1
    ph, pw = ((max(int(s[d]) for s in sizes) + div - 1) // div * div for d in (0, 1))
    batch = torch.zeros(len(sizes), 3, ph, pw)
    for i, name in enumerate(seeded.PHOTOS):
        x = _resized_bgr(name, sizes[i]) - means
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch


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
    batch = _detectron2_batch(ref, arch, means)
    cls_all, reg_all = [], []
    for i in range(len(seeded.PHOTOS)):
        feats = model.Conv_Body(batch[i : i + 1])
        cls, reg = model.Box_Outs(model.Box_Head(feats, [torch.from_numpy(ref[f"im{i}_rois"])]))
        cls_all.append(cls)
        reg_all.append(reg)
    n = ref["im0_rois"].shape[0]
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


def _model(fmt: str, arch: str, tmp_path) -> Generalized_RCNN:
    """Our model for ``arch`` from configs/detectron2/ at the fixture's test size, with the seeded weights of
    ``fmt`` loaded through ``load_ckpt``."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "detectron2", f"mask_rcnn_{arch}_3x.yaml"))
    cfg.merge_from_list(["OPS_BACKEND", "torchvision", "TEST.SCALE", seeded.MIN_SIZE_TEST,
                         "TEST.MAX_SIZE", seeded.MAX_SIZE_TEST])
    model = Generalized_RCNN(cfg).eval()
    load_ckpt(model, _write(fmt, arch, tmp_path))
    return model


def _photo_rgb(name: str) -> torch.Tensor:
    """The photo as a user gives it to the model: ``(3, H, W)`` float RGB in [0, 1]."""
    rgb = np.asarray(Image.open(os.path.join(DATA, name)).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def _forward_keeping_parts(model: Generalized_RCNN, images):
    """``model(images)`` once, with what its parts returned on the way (forward hooks): the pre-processed batch,
    the RPN head's outputs, the anchors, the proposals and the RoI heads' raw (network-input pixel) results."""
    seen = {}
    parts = {"batch": model.preprocess, "rpn_head": model.RPN.head, "anchors": model.RPN.anchor_generator,
             "rpn": model.RPN, "roi_heads": model.roi_heads}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out)) for k, m in parts.items()]
    try:
        out = model(images)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


#: Tolerances: float rounding through 50 layers, summed in a different order than detectron2's (the measured
#: maxima in docs/model_zoo.md are 4-10x below them).
PROPOSAL_BOX_ATOL, PROPOSAL_LOGIT_ATOL = 1e-2, 2e-4
DETECTION_BOX_ATOL, DETECTION_SCORE_ATOL = 1e-2, 1e-4
MASK_PROB_ATOL = 1e-3  # float16 fixture (rounding up to 2.4e-4) + float rounding
#: A pasted pixel may differ only where the probability is this close to detectron2's threshold 0.5, and only a few.
PASTE_MARGIN, PASTE_MAX_FLIPS = 1e-3, 10


def align_score_ties(boxes: torch.Tensor, labels: torch.Tensor, ref_boxes: torch.Tensor, ref_scores: torch.Tensor,
                     ref_labels: torch.Tensor, box_atol: float = DETECTION_BOX_ATOL,
                     score_atol: float = DETECTION_SCORE_ATOL) -> torch.Tensor:
    """The order of our detections that lines them up with detectron2's, where they may differ: two detections of
    the same class whose reference scores are within ``score_atol`` are a tie, and float sums computed in another
    order (another CPU's kernels) may rank a tie either way. Returns ``perm`` (``ours[perm]`` vs the reference);
    a detection that differs from the reference without such a tie partner stays in place (and fails the
    caller's comparison)."""
    n = ref_boxes.shape[0]
    perm = list(range(n))
    for i in range(n):
        if (boxes[perm[i]] - ref_boxes[i]).abs().max() <= box_atol:
            continue
        for j in range(i + 1, n):
            tie = abs(float(ref_scores[j] - ref_scores[i])) <= score_atol and bool(ref_labels[j] == ref_labels[i])
            if tie and bool(labels[perm[j]] == labels[perm[i]]) and (
                    boxes[perm[j]] - ref_boxes[i]).abs().max() <= box_atol:
                perm[i], perm[j] = perm[j], perm[i]
                break
    return torch.tensor(perm, dtype=torch.long)


def check_outputs_against_detectron2(model: Generalized_RCNN, arch: str) -> str:
    """Runs ``model`` on the fixture photos and asserts that it computed what detectron2 computed (see the module
    docstring); returns the figures as one line."""
    ref = np.load(os.path.join(FIXTURES, f"ref_{arch}.npz"))
    images = [_photo_rgb(name) for name in seeded.PHOTOS]
    n_img = len(images)
    out, seen = _forward_keeping_parts(model, images)

    # Pre-processing: detectron2's ResizeShortestEdge sizes and pixels (PIL bilinear on uint8), and its padding.
    image_list, _ = seen["batch"]
    assert image_list.image_sizes == [tuple(int(v) for v in ref[f"im{i}_resized"]) for i in range(n_img)]
    means = model.preprocess.pixel_mean.view(3, 1, 1)
    assert torch.equal(image_list.tensors, _detectron2_batch(ref, arch, means)), "input pixels differ from PIL's"

    # Proposals, with their logits: the RPN's own settings and outputs, through the function its forward calls.
    rpn, gp = model.RPN, model.RPN.RPN_GenerateProposals
    objectness, deltas = seen["rpn_head"]
    boxes, logits = generate_proposals(
        objectness, deltas, seen["anchors"], image_list.image_sizes, gp.setting("pre_nms_top_n"),
        gp.setting("post_nms_top_n"), gp.setting("nms_thresh"), gp.setting("min_size"), rpn.box_coder,
        rpn.score_thresh, min_size_strict=rpn.min_size_strict, nms_on_logits=rpn.nms_on_logits, return_logits=True)
    proposals, _ = seen["rpn"]
    prop_box = prop_logit = 0.0
    for i in range(n_img):
        assert torch.equal(proposals[i], boxes[i])  # the model's own proposals
        ref_b, ref_l = torch.from_numpy(ref[f"im{i}_proposals"]), torch.from_numpy(ref[f"im{i}_proposal_logits"])
        k = ref_b.shape[0]
        assert boxes[i].shape[0] >= k
        prop_box = max(prop_box, (boxes[i][:k] - ref_b).abs().max().item())
        prop_logit = max(prop_logit, (logits[i][:k] - ref_l).abs().max().item())
        torch.testing.assert_close(boxes[i][:k], ref_b, rtol=0, atol=PROPOSAL_BOX_ATOL)
        torch.testing.assert_close(logits[i][:k], ref_l, rtol=0, atol=PROPOSAL_LOGIT_ATOL)

    # Detections that tie in score with another of their class may come out in either order on another CPU: line
    # ours up with the reference inside such ties (align_score_ties), for the raw and the final outputs alike.
    raw, _ = seen["roi_heads"]
    swapped = 0
    for i, o in enumerate(out):
        perm = align_score_ties(o["boxes"], o["labels"] - 1, torch.from_numpy(ref[f"im{i}_boxes"]),
                                torch.from_numpy(ref[f"im{i}_scores"]), torch.from_numpy(ref[f"im{i}_classes"]))
        swapped += int((perm != torch.arange(perm.numel())).sum())
        out[i] = {k: v[perm] if torch.is_tensor(v) and v.shape[:1] == perm.shape else v for k, v in o.items()}
        raw[i] = {k: v[perm] if torch.is_tensor(v) and v.shape[:1] == perm.shape else v for k, v in raw[i].items()}

    # Mask probabilities before pasting (detectron2's raw outputs, do_postprocess=False).
    mask_prob = 0.0
    for i, r in enumerate(raw):
        ref_m = torch.from_numpy(ref[f"im{i}_mask_probs"].astype(np.float32))
        ours_m = r["masks"][: ref_m.shape[0], 0]
        mask_prob = max(mask_prob, (ours_m - ref_m).abs().max().item())
        torch.testing.assert_close(ours_m, ref_m, rtol=0, atol=MASK_PROB_ATOL)

    # Final detections in original-image pixels: same count, order, classes; boxes and scores; pasted masks.
    det_box = det_score = 0.0
    matched = total = flips = pixels = 0
    min_iou = 1.0
    for i, o in enumerate(out):
        ref_boxes = torch.from_numpy(ref[f"im{i}_boxes"])
        ref_scores = torch.from_numpy(ref[f"im{i}_scores"])
        ref_classes = torch.from_numpy(ref[f"im{i}_classes"])
        assert o["boxes"].shape == ref_boxes.shape, (o["boxes"].shape, ref_boxes.shape)
        labels = o["labels"] - 1  # ours count the background as class 0; detectron2's classes start at 0
        matched += int((labels == ref_classes).sum())
        total += int(ref_classes.numel())
        assert torch.equal(labels, ref_classes)
        det_box = max(det_box, (o["boxes"] - ref_boxes).abs().max().item())
        det_score = max(det_score, (o["scores"] - ref_scores).abs().max().item())
        torch.testing.assert_close(o["boxes"], ref_boxes, rtol=0, atol=DETECTION_BOX_ATOL)
        torch.testing.assert_close(o["scores"], ref_scores, rtol=0, atol=DETECTION_SCORE_ATOL)
        h, w = (int(v) for v in ref[f"im{i}_image_size"])
        ref_pasted = torch.from_numpy(np.unpackbits(ref[f"im{i}_masks_packed"], axis=-1)[..., :w].astype(bool))
        probs = o["masks"][: ref_pasted.shape[0], 0]
        assert probs.shape == ref_pasted.shape == (ref_pasted.shape[0], h, w)
        ours_pasted = probs >= 0.5  # detectron2 binarises with >= 0.5
        differ = ours_pasted != ref_pasted
        flips += int(differ.sum())
        pixels += differ.numel()
        inter = (ours_pasted & ref_pasted).flatten(1).sum(1).double()
        union = (ours_pasted | ref_pasted).flatten(1).sum(1).double()
        assert (union > 0).all()
        min_iou = min(min_iou, (inter / union).min().item())
        assert (probs[differ] - 0.5).abs().le(PASTE_MARGIN).all(), "a pasted pixel differs away from the threshold"
    assert flips <= PASTE_MAX_FLIPS
    return (f"input pixels identical; proposals top-{ref['im0_proposals'].shape[0]} x {n_img}: max |box| "
            f"{prop_box:.1e} px, max |logit| {prop_logit:.1e}; detections {matched}/{total} matched (classes, "
            f"order; {swapped} swapped inside score ties): max |box| {det_box:.1e} px, max |score| {det_score:.1e}; "
            f"mask probs max |diff| {mask_prob:.1e}; "
            f"pasted masks ({ref['im0_masks_packed'].shape[0]} x {n_img}): {flips} of {pixels} pixels differ, "
            f"min IoU {min_iou:.6f}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["R_50_FPN", "R_50_C4"])
@pytest.mark.parametrize("fmt", ["detectron2", "detectron"])
def test_outputs_match_detectron2(fmt, arch, tmp_path):
    """End to end from the photos. Detectron.pytorch files are covered by
    :func:`test_detectron_pytorch_round_trip_loads_the_pkl_weights`: their loaded weights are bit-identical to the
    Detectron .pkl's, so their outputs are these."""
    print(f"{fmt} {arch} vs detectron2: " + check_outputs_against_detectron2(_model(fmt, arch, tmp_path), arch))


@pytest.mark.parametrize("arch", ["R_50_FPN", "R_50_C4"])
def test_detectron_pytorch_round_trip_loads_the_pkl_weights(arch, tmp_path):
    """A Detectron.pytorch file (written by our inverse converter from the same weights) loads into exactly the
    parameters and buffers the Detectron .pkl gives, bit for bit: its outputs are the .pkl's of
    :func:`test_outputs_match_detectron2`."""
    a = _model("detectron", arch, tmp_path).state_dict()
    b = _model("detectron.pytorch", arch, tmp_path).state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:10]
    print(f"detectron.pytorch {arch}: {len(a)} tensors bit-identical to the Detectron .pkl's after load_ckpt")
