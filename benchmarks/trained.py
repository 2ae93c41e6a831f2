"""Trained weights for the benchmark's well-separated row: R-50-FPN fine-tuned on the synthetic shapes set.

The seeded random weights of ``common.build_torchvision`` give 100 detections whose neighbouring scores differ by
~1e-5, so the score threshold 0.05 keeps them all and NMS decides among near-ties. A model that has learnt the
shapes gives few detections with well-separated scores, which is the regime the default ``TEST.SCORE_THRESH``
(0.05) is meant for. No download is possible here, so the benchmark trains one itself:

1. torchvision's ``maskrcnn_resnet50_fpn`` layout with the calibrated random weights of ``common.build_torchvision``
   (FrozenBN, stem and res2 frozen, as ``trainable_backbone_layers=3``) is fine-tuned with torchvision's own
   losses for ``iters`` SGD steps on ``synthetic:train`` images (128x128 shapes, resized to ``size``);
2. the weights go torchvision -> ours (``convert_to_ours``, strict load into
   ``configs/torchvision/e2e_mask_rcnn_R-50-FPN.yaml``) and back ours -> torchvision
   (``ours_to_canonical`` + ``canonical_to_torchvision``, strict load into a fresh torchvision model): both
   directions of ``maskrcnn.utils.weights.torchvision`` are exercised, and the benchmark times that round-tripped
   torchvision model against ours.

``--trained PATH`` in ``inference.py`` loads a torchvision-layout state dict saved by :func:`save` instead of
training (e.g. to re-run the timing on the same weights).

As a script, it writes the fine-tuned weights as one of our checkpoints, for the AP checks of reduced precision
on torchvision-converted weights (``inference.py ap``)::

    python benchmarks/trained.py --iters 300 --out DIR     # DIR/config.yaml, DIR/model_final.pth, DIR/torchvision.pth
    python benchmarks/inference.py ap --cfg DIR/config.yaml --ckpt DIR/model_final.pth --modes bf16,int8

The checkpoint keeps the background and the three synthetic classes of the 91-class predictors (the fine-tune
only uses labels 1..3), as torchvision's fine-tuning tutorial gives a model a new class count.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import common

#: Synthetic images (128x128) are resized to this (min_size, max_size): objects 20-120 px, within the anchors.
TRAINED_SIZE = (256, 256)


def synthetic_images(split: str, indices, size: Tuple[int, int] = (128, 128)):
    """``[(image float32 (3, H, W) RGB in [0, 1], target)]`` from ``SyntheticShapesDataset(split)``; targets in
    torchvision's convention (``boxes`` float (N, 4) x1y1x2y2 pixels, ``labels`` int64 1..3, ``masks`` uint8)."""
    from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset

    ds = SyntheticShapesDataset(split=split, image_size=size)
    out = []
    for i in indices:
        image, t = ds[i]
        # The dataset returns float32 RGB in [0, 1] already.
        out.append((image.float(), {"boxes": t["boxes"].float(), "labels": t["labels"].long(),
                                            "masks": t["masks"].to(torch.uint8)}))
    return out


def train_torchvision(iters: int = 60, batch: int = 2, lr: float = 0.01, seed: int = 0,
                      size: Tuple[int, int] = TRAINED_SIZE, log=print) -> nn.Module:
    """torchvision Mask R-CNN (91 classes, labels 1..3 used) fine-tuned on ``synthetic:train``; eval mode."""
    calib = synthetic_images("train", [0])[0][0]
    model = common.build_torchvision(seed=seed, calib_image=calib, size=size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    warm = max(1, iters // 5)
    torch.manual_seed(seed)
    start = time.perf_counter()
    for it in range(iters):
        with torch.enable_grad():  # the benchmark builds its models under no_grad
            total, losses = _step(model, opt, params, it, iters, batch, lr, warm)
        if it % 10 == 0 or it == iters - 1:
            log(f"train it {it}: loss {float(total):.3f} ("
                + ", ".join(f"{k} {float(v):.3f}" for k, v in losses.items()) + f"), {time.perf_counter() - start:.0f} s")
    return model.eval()


def _step(model, opt, params, it, iters, batch, lr, warm):
    """One SGD step on the images ``it * batch ...``; returns the total and the separate losses."""
    data = synthetic_images("train", [i % _train_size() for i in range(it * batch, (it + 1) * batch)])
    for g in opt.param_groups:  # linear warm-up: from the random heads' large initial losses
        g["lr"] = lr * min(1.0, (it + 1) / warm)
    losses = model([d[0] for d in data], [d[1] for d in data])
    total = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    opt.step()
    return total.detach(), {k: v.detach() for k, v in losses.items()}


@functools.lru_cache(maxsize=None)
def _train_size() -> int:
    """Images in ``synthetic:train``: longer runs cycle through them (epochs)."""
    from maskrcnn.data.datasets.synthetic import SyntheticShapesDataset

    return len(SyntheticShapesDataset(split="train"))


def save(model: nn.Module, path: str) -> None:
    torch.save(model.state_dict(), path)


def load_torchvision(path: str, size: Tuple[int, int] = TRAINED_SIZE) -> nn.Module:
    model = common.build_torchvision(size=size, calib_image=synthetic_images("train", [0])[0][0])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def round_trip(tv: nn.Module, score_thresh: float, size: Tuple[int, int] = TRAINED_SIZE
               ) -> Tuple[nn.Module, nn.Module]:
    """``(torchvision, ours)`` holding ``tv``'s weights: ours by torchvision -> ours, the returned torchvision
    model by ours -> torchvision (both strict loads), both at ``score_thresh``."""
    from torchvision.models.detection import MaskRCNN  # noqa: F401  (torchvision must be importable)

    from maskrcnn.utils.weights.ours import ours_to_canonical
    from maskrcnn.utils.weights.torchvision import canonical_to_torchvision

    ours = common.build_ours(tv, score_thresh=score_thresh, size=size)
    back = canonical_to_torchvision(ours_to_canonical(ours.state_dict()))
    tv2 = common.build_torchvision(score_thresh=score_thresh, size=size,
                                   calib_image=synthetic_images("train", [0])[0][0])
    missing, unexpected = tv2.load_state_dict(back, strict=False)
    # FrozenBN has no num_batches_tracked and torchvision keeps no other buffer: anything missing is an error.
    if missing or unexpected:
        raise RuntimeError(f"ours -> torchvision round trip: missing {missing}, unexpected {unexpected}")
    for (k, a), b in zip(tv.state_dict().items(), tv2.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError(f"ours -> torchvision round trip changed {k}")
    return tv2.eval(), ours


def val_images(n: int = 2) -> List[torch.Tensor]:
    return [im for im, _ in synthetic_images("val", range(n))]


#: Classes kept by :func:`ours_checkpoint`: the background and the synthetic set's three shapes (labels 1..3).
SYNTHETIC_CLASSES = 4


def ours_checkpoint(tv: nn.Module, out_dir: str, size: Tuple[int, int] = TRAINED_SIZE) -> Tuple[str, str]:
    """Write ``tv``'s weights (converted to ours, predictors cut to :data:`SYNTHETIC_CLASSES`) as
    ``out_dir/model_final.pth`` with its ``out_dir/config.yaml``; returns ``(config path, checkpoint path)``."""
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

    ours = common.build_ours(tv, size=size)
    k = SYNTHETIC_CLASSES
    cut = {"Box_Outs.cls_score": k, "Box_Outs.bbox_pred": 4 * k, "Mask_Outs.mask_fcn_logits": k}
    sd = {}
    for name, value in ours.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        sd[name] = value[:cut[prefix]].clone() if prefix in cut else value
    cfg = common.ours_cfg(size=size, opts=["MODEL.NUM_CLASSES", k, "TEST.SCORE_THRESH", 0.05,
                                           "TEST.DATASETS", ["synthetic:val"]])
    model = Generalized_RCNN(cfg)
    model.load_state_dict(sd, strict=True)  # the cut predictors fit the 4-class model exactly
    os.makedirs(out_dir, exist_ok=True)
    cfg_path, ckpt_path = os.path.join(out_dir, "config.yaml"), os.path.join(out_dir, "model_final.pth")
    with open(cfg_path, "w") as f:
        f.write(cfg.dump())
    torch.save({"model": model.state_dict(), "iteration": 0}, ckpt_path)
    return cfg_path, ckpt_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fine-tune torchvision's R-50-FPN on synthetic:train and write it as "
                                "one of our checkpoints (see the module docstring)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=None)
    common.add_flush_denormal_arg(p)
    args = p.parse_args(argv)
    common.apply_flush_denormal(args.flush_denormal)  # first: the thread pool inherits it
    if args.threads:
        torch.set_num_threads(args.threads)
    tv = train_torchvision(iters=args.iters)
    os.makedirs(args.out, exist_ok=True)
    save(tv, os.path.join(args.out, "torchvision.pth"))
    cfg_path, ckpt_path = ours_checkpoint(tv, args.out)
    print(f"wrote {ckpt_path} and {cfg_path} (torchvision weights: {os.path.join(args.out, 'torchvision.pth')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
