"""Where a trained model's mask AP goes: box error, the 28x28 mask's resolution, or the mask head.

    python benchmarks/mask_quality.py --load_ckpt OUT/model_final.pth --dataset synthetic:thin:val --images 100

For each ground-truth instance of the first ``--images`` images, the detection of its class whose box overlaps it
most is its match; per class, the means of:

* ``oracle@gt``: mask IoU with the ground truth of the ground truth's own mask cut to ``M x M`` at its own box
  (as the training targets are cut) and pasted back: the ceiling the mask resolution sets;
* ``box IoU``: the match's box against the ground-truth box;
* ``oracle@pred``: the same cut-and-paste at the match's box: the ceiling for a perfect mask head given the box;
* ``pred``: the match's own mask (binarised at ``MRCNN.THRESH_BINARIZE``) against the ground truth; 0 for an
  instance without a detection of its class.

Masks are pasted as the model pastes them (``TEST.MASK_PASTE_METHOD``). The model and its config come from the
checkpoint (``train_net`` saves the config in it).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def measure(predictor, dataset, num_images: int) -> Dict[int, List[Tuple[float, float, float, float]]]:
    """Per class label, one ``(oracle@gt, box IoU, oracle@pred, pred)`` row per non-crowd ground-truth instance of
    the first ``num_images`` images of ``dataset`` (``(image, target)`` items with ``masks``)."""
    from torchvision.ops import box_iou

    from maskrcnn.ops.masks import paste_masks_by_method, project_masks_on_boxes

    cfg = predictor.cfg
    method, m, thresh = cfg.TEST.MASK_PASTE_METHOD, int(cfg.MRCNN.RESOLUTION), float(cfg.MRCNN.THRESH_BINARIZE)
    rows: Dict[int, List[Tuple[float, float, float, float]]] = defaultdict(list)
    zero = torch.zeros(1, dtype=torch.long)

    def cut_and_paste(gt_mask, box, hw):
        target = project_masks_on_boxes(gt_mask[None].float(), box, zero, m)
        return paste_masks_by_method(target[:, None], box, hw, method=method)[0, 0] >= 0.5

    for k in range(min(len(dataset), num_images)):
        image, target = dataset[k]
        out = predictor(image)
        hw = tuple(image.shape[-2:])
        crowd = target.get("iscrowd", torch.zeros(len(target["boxes"]), dtype=torch.long))
        for g in range(len(target["boxes"])):
            if int(crowd[g]):
                continue
            label, gt_box, gt_mask = int(target["labels"][g]), target["boxes"][g:g + 1].float(), target["masks"][g]
            ceiling = mask_iou(cut_and_paste(gt_mask, gt_box, hw), gt_mask)
            same = (out["labels"] == label).nonzero()[:, 0]
            if len(same) == 0:
                rows[label].append((ceiling, 0.0, 0.0, 0.0))
                continue
            ious = box_iou(gt_box, out["boxes"][same].float())[0]
            j = int(same[int(ious.argmax())])
            box = out["boxes"][j:j + 1].float()
            mask = out["masks"][j]
            mask = mask[0] if mask.dim() == 3 else mask
            mask = mask >= thresh if mask.is_floating_point() else mask.bool()
            rows[label].append((ceiling, float(ious.max()), mask_iou(cut_and_paste(gt_mask, box, hw), gt_mask),
                                mask_iou(mask, gt_mask)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load_ckpt", required=True, help="a train_net checkpoint (it holds its config)")
    p.add_argument("--dataset", required=True, help="a dataset spec with masks, e.g. synthetic:thin:val")
    p.add_argument("--images", type=int, default=100)
    args = p.parse_args(argv)

    from maskrcnn.data.catalog import build_dataset
    from maskrcnn.predictor import Predictor

    predictor = Predictor(None, args.load_ckpt, device="cpu")
    rows = measure(predictor, build_dataset(args.dataset, is_train=False), args.images)
    names = predictor.class_names
    print(f"{'class':12s} {'n':>4s} {'oracle@gt':>10s} {'box IoU':>8s} {'oracle@pred':>12s} {'pred':>6s}")
    for label in sorted(rows):
        a = np.array(rows[label])
        print(f"{names[label]:12s} {len(a):4d} {a[:, 0].mean():10.3f} {a[:, 1].mean():8.3f} {a[:, 2].mean():12.3f} "
              f"{a[:, 3].mean():6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
