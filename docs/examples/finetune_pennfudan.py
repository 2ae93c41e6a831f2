#!/usr/bin/env python
"""Fine-tuning on Penn-Fudan pedestrians, the torchvision tutorial's workflow with this package.

    python docs/examples/finetune_pennfudan.py --root ../shared/data/PennFudanPed-sample --epochs 10 \
        [--weights tv_converted.pth] [--out output/pennfudan]

Steps, as in the tutorial: a dataset returning ``boxes, labels, masks, image_id, area, iscrowd``; a Mask R-CNN whose
box and mask predictors (``Box_Outs``, ``Mask_Outs``) are replaced for 2 classes; custom anchor sizes/ratios and a
custom RoIAlign pooler; SGD + StepLR; COCO mAP after every epoch; predictions drawn at the end through
``maskrcnn.Predictor.from_model``. Without ``--weights`` (a checkpoint converted with ``tools/convert_weights.py
--src torchvision``) the model starts from random weights, so a few epochs only show the mechanics; with COCO
weights it reaches the tutorial's numbers.
``--body R-18`` switches to a small ResNet-18-FPN (random init, BatchNorm) to run quickly on a CPU.
"""
import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import cv2  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from maskrcnn import Predictor  # noqa: E402
from maskrcnn.config import get_cfg  # noqa: E402
from maskrcnn.data.collate import collate_fn  # noqa: E402
from maskrcnn.data.datasets.pennfudan import PennFudanDataset  # noqa: E402
from maskrcnn.data.transforms import RandomHorizontalFlip  # noqa: E402
from maskrcnn.engine.inference import inference_on_dataset, records_to_coco_results  # noqa: E402
from maskrcnn.evaluation.coco import coco_gt_from_dataset, evaluate_coco  # noqa: E402
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN  # noqa: E402
from maskrcnn.modeling.roi_heads.box_head import Roi2MLPHead  # noqa: E402
from maskrcnn.modeling.roi_heads.box_outputs import FastRCNNOutputs  # noqa: E402
from maskrcnn.modeling.roi_heads.mask_outputs import MaskRCNNOutputs  # noqa: E402
from maskrcnn.modeling.rpn.anchors import AnchorGenerator  # noqa: E402
from maskrcnn.modeling.rpn.head import RPNHead  # noqa: E402
from maskrcnn.utils.checkpoint import load_ckpt  # noqa: E402
from maskrcnn.utils.vis import draw_instances  # noqa: E402


def build_model(args, num_classes: int = 2) -> Generalized_RCNN:
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "torchvision", "e2e_mask_rcnn_R-50-FPN.yaml"))
    cfg.merge_from_list(["TRAIN.SCALES", f"({args.scale},)", "TRAIN.MAX_SIZE", int(args.scale * 1.667),
                         "TEST.SCALE", args.scale, "TEST.MAX_SIZE", int(args.scale * 1.667)])
    if args.body == "R-18":
        cfg.merge_from_list(["MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body", "RESNETS.NORM", "BN",
                             "RESNETS.FREEZE_AT", 0])
    model = Generalized_RCNN(cfg)
    if args.weights:
        load_ckpt(model, args.weights)  # the 91-class COCO model
    # 1. New predictors for our class count; everything else is kept.
    model.Box_Outs = FastRCNNOutputs(model.Box_Head.out_channels, num_classes)
    model.Mask_Outs = MaskRCNNOutputs(model.Mask_Head.out_channels, num_classes)
    # 2. Custom anchors: three sizes and three ratios per level (the head must predict 9 anchors per location).
    if args.custom_anchors:
        anchors = AnchorGenerator(sizes=[(16, 24, 32), (32, 48, 64), (64, 96, 128), (128, 192, 256), (256, 384, 512)],
                                  aspect_ratios=[(1.0, 2.0, 3.0)] * 5, strides=[4, 8, 16, 32, 64])
        model.RPN.anchor_generator = anchors
        model.RPN.RPN_GenerateProposals.anchor_generator = anchors
        model.RPN.head = RPNHead(model.Conv_Body.out_channels, anchors.num_anchors_per_location()[0])
    # 3. A custom RoIAlign pooler for the box head: 5x5 bins, 4 samples per bin, aligned (half-pixel) boxes.
    if args.custom_pooler:
        model.Box_Head = Roi2MLPHead(model.Conv_Body.out_channels, model.spatial_scales[:4], resolution=5,
                                     sampling_ratio=4, mlp_dim=1024, aligned=True)
        model.Box_Outs = FastRCNNOutputs(model.Box_Head.out_channels, num_classes)
    return model


def evaluate(model, dataset, device, log=print):
    records = inference_on_dataset(model, dataset, device=device, log=lambda *a: None)
    results = records_to_coco_results(records, dataset)
    return evaluate_coco(coco_gt_from_dataset(dataset), results, log=log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="PennFudanPed folder (PNGImages/, PedMasks/)")
    p.add_argument("--weights", default=None, help="converted COCO checkpoint to start from")
    p.add_argument("--out", default="output/pennfudan", help="where pictures are written")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max_iters_per_epoch", type=int, default=0, help="0: the whole training split")
    p.add_argument("--scale", type=int, default=800, help="shorter image side")
    p.add_argument("--body", choices=["R-50", "R-18"], default="R-50")
    p.add_argument("--num_test", type=int, default=10, help="images held out for evaluation")
    p.add_argument("--custom_anchors", action="store_true")
    p.add_argument("--custom_pooler", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    full = PennFudanDataset(args.root, split="all")
    n = len(full)
    train_set = PennFudanDataset(args.root, split="all", transforms=RandomHorizontalFlip(0.5))
    train_set = Subset(train_set, list(range(0, n - args.num_test)))
    test_set = Subset(full, list(range(n - args.num_test, n)))
    test_set.classes = full.classes
    test_set.get_image_info = lambda i: full.get_image_info(n - args.num_test + i)
    loader = DataLoader(train_set, batch_size=2, shuffle=True, collate_fn=collate_fn, num_workers=0)

    model = build_model(args).to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    for epoch in range(args.epochs):
        model.train()
        for it, (images, targets) in enumerate(loader):
            if args.max_iters_per_epoch and it >= args.max_iters_per_epoch:
                break
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                print(f"non-finite loss at epoch {epoch} iteration {it}: {losses}")
                return 1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if it % 10 == 0:
                print(f"epoch {epoch} iter {it} loss {loss.item():.3f} "
                      + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
        lr_scheduler.step()
        metrics = evaluate(model, test_set, device)
        print(f"epoch {epoch}: box AP {metrics['bbox']['AP']:.1f}, mask AP {metrics.get('segm', {}).get('AP', 0):.1f}")

    # 4. Predictions: the trained model behind a Predictor, which applies the inference speed features (folded BN,
    #    fused convolutions, channels-last) to it in place; from here on the model is for inference only.
    os.makedirs(args.out, exist_ok=True)
    predictor = Predictor.from_model(model, class_names=full.classes)
    for i in range(min(3, len(test_set))):
        image, _ = test_set[i]  # (3, H, W) RGB float tensor
        det = predictor(image)
        rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        masks = list((det["masks"][:, 0] > 0.5).numpy())
        drawn = draw_instances(rgb, det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy(), masks,
                               class_names=predictor.class_names, thresh=0.5)
        path = os.path.join(args.out, f"prediction_{i}.png")
        cv2.imwrite(path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        print(f"wrote {path}: {', '.join(det['class_names'][:5]) or 'no detections'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
