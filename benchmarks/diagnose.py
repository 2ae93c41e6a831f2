"""Where a trained model fails: RPN recall and the box classifier on the ground-truth boxes, per object size.

    python benchmarks/diagnose.py --cfg OUT/config.yaml --load_ckpt OUT/model_final.pth \\
        --dataset synthetic:span:train --images 60

For each non-crowd ground-truth box of the first ``--images`` images (one image per forward pass, no padding):

* ``rpn_recall``: whether one of the RPN's test-time proposals overlaps it at IoU >= 0.5;
* ``p_true``: the box classifier's softmax probability of the box's class, with the box itself as the RoI
  (so the RPN's errors are left out); ``acc``: how often that class is the arg-max (background included); ``p_bg``:
  the probability of background;

grouped by the box's size (sqrt of its area in input pixels: under 16, 16-64, 64 and more). With ``--norm-stats
batch`` every BatchNorm layer normalises with the image's own statistics instead of its running averages: a model
that is right only that way learned on batch statistics its running averages do not represent (docs/auto.md,
"Second round"). ``--by-image`` adds ``p_true`` by image size, aspect, crowd regions and class.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def size_bucket(size: float) -> str:
    return "< 16 px" if size < 16 else "16-64 px" if size < 64 else ">= 64 px"


@torch.no_grad()
def diagnose(model, dataset, num_images: int, batch_stats: bool = False) -> List[Dict]:
    """One row per non-crowd ground-truth box: ``size``, ``recall`` (bool), ``p_true``, ``acc``, ``p_bg`` and the
    image's ``short``, ``aspect``, ``crowd`` and the box's ``label``."""
    from torchvision.ops import box_iou

    model = copy.deepcopy(model).eval()
    if batch_stats:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()  # this copy is thrown away: its running averages may change
    rows = []
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.int64))
        keep = crowd == 0
        gt, labels = target["boxes"][keep], target["labels"][keep]
        if not len(gt):
            continue
        image_list, _ = model.preprocess([image], None)
        features = model.Conv_Body(image_list.tensors)
        proposals, _ = model.propose(features, image_list)
        h, w = image.shape[-2:]
        hh, ww = image_list.image_sizes[0]
        scale = torch.tensor([ww / w, hh / h, ww / w, hh / h])
        boxes = gt * scale
        probs = model.roi_heads.predict_boxes(features, [boxes], image_list.image_sizes)[0][0]
        iou = box_iou(boxes, proposals[0]).max(1).values if len(proposals[0]) else torch.zeros(len(boxes))
        for j in range(len(boxes)):
            size = float(((boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])).clamp(min=0).sqrt())
            rows.append({"size": size, "recall": bool(iou[j] >= 0.5), "p_true": float(probs[j, labels[j]]),
                         "acc": int(probs[j].argmax()) == int(labels[j]), "p_bg": float(probs[j, 0]),
                         "short": min(h, w), "aspect": max(h, w) / min(h, w), "crowd": bool((crowd == 1).any()),
                         "label": int(labels[j])})
    return rows


def summary(rows: List[Dict], groups: Dict[str, callable]) -> List[str]:
    lines = []
    for name, pick in groups.items():
        sel = [r for r in rows if pick(r)]
        if not sel:
            continue
        mean = lambda k: float(np.mean([float(r[k]) for r in sel]))  # noqa: E731
        lines.append(f"  {name:26s} n={len(sel):4d}  rpn_recall {mean('recall'):.2f}  p_true {mean('p_true'):.2f}  "
                     f"acc {mean('acc'):.2f}  p_bg {mean('p_bg'):.2f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="the run's config.yaml")
    p.add_argument("--load_ckpt", required=True, help="checkpoint")
    p.add_argument("--dataset", required=True, help="dataset spec, e.g. synthetic:span:train or coco:ANN:IMAGES")
    p.add_argument("--images", type=int, default=60, help="first N images")
    p.add_argument("--norm-stats", choices=("running", "batch", "both"), default="both",
                   help="BatchNorm with its running averages, with each image's statistics, or both")
    p.add_argument("--by-image", action="store_true", help="also p_true by image size, aspect, crowd and class")
    args = p.parse_args(argv)

    from maskrcnn.config import assert_and_infer_cfg, cfg_from_file, get_cfg
    from maskrcnn.data.catalog import build_dataset
    from maskrcnn.modeling.build import build_model
    from maskrcnn.utils.checkpoint import load_ckpt

    cfg = get_cfg()
    cfg_from_file(args.cfg, cfg)
    assert_and_infer_cfg(cfg, make_immutable=False)
    model = build_model(cfg)
    load_ckpt(model, args.load_ckpt)
    dataset = build_dataset(args.dataset, is_train=False)
    classes = getattr(dataset, "classes", None)
    modes = {"running": [False], "batch": [True], "both": [False, True]}[args.norm_stats]
    for batch_stats in modes:
        rows = diagnose(model, dataset, args.images, batch_stats)
        print(f"{args.dataset}, {args.images} images, BatchNorm with "
              f"{'each image' + chr(39) + 's statistics' if batch_stats else 'its running averages'}:")
        buckets = {b: (lambda r, b=b: size_bucket(r["size"]) == b) for b in ("< 16 px", "16-64 px", ">= 64 px")}
        print("\n".join(summary(rows, {"all": lambda r: True, **buckets})))
        if args.by_image:
            groups = {"image shorter side < 200": lambda r: r["short"] < 200,
                      "image shorter side >= 300": lambda r: r["short"] >= 300,
                      "image aspect > 2": lambda r: r["aspect"] > 2,
                      "image with a crowd region": lambda r: r["crowd"],
                      "image without": lambda r: not r["crowd"]}
            for k in sorted({r["label"] for r in rows}):
                name = classes[k] if classes is not None and k < len(classes) else str(k)
                groups[f"class {name}"] = lambda r, k=k: r["label"] == k
            print("\n".join(summary(rows, groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
