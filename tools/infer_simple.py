#!/usr/bin/env python
"""Run a trained model on images and write one picture per image with masks, boxes, class names and scores.

    python tools/infer_simple.py --cfg CFG --load_ckpt MODEL.pth (--images a.jpg b.png | --image_dir DIR) \
        --output_dir OUT [--thresh 0.7] [--set KEY VALUE ...]

Class names come from the checkpoint (``classes``, written by train_net) when present, else from the COCO list
when the model has 81 classes, else "class k".
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="config file")
    p.add_argument("--load_ckpt", required=True, help="checkpoint to load")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--image_dir", help="folder of images")
    p.add_argument("--output_dir", required=True, help="where the pictures are written")
    p.add_argument("--thresh", type=float, default=0.7, help="score threshold for drawing")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--no_cuda", action="store_true", help="run on the CPU even if CUDA is available")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import cv2
    import torch

    from maskrcnn.config import ConfigError, assert_and_infer_cfg, get_cfg
    from maskrcnn.core.test import im_detect_all
    from maskrcnn.engine.speed import prepare_for_inference
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.checkpoint import load_ckpt
    from maskrcnn.utils.vis import COCO_CLASSES, vis_one_image

    cfg = get_cfg()
    try:
        cfg.merge_from_file(args.cfg)
        cfg.merge_from_list(args.set)
        assert_and_infer_cfg(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.image_dir:
        if not os.path.isdir(args.image_dir):
            print(f"--image_dir {args.image_dir}: not a folder", file=sys.stderr)
            return 2
        images = sorted(os.path.join(args.image_dir, f) for f in os.listdir(args.image_dir)
                        if f.lower().endswith(IMAGE_EXTS))
    else:
        images = args.images
    missing = [f for f in images if not os.path.isfile(f)]
    if missing:
        print(f"image files not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    model = Generalized_RCNN(cfg)
    info = load_ckpt(model, args.load_ckpt)
    # The TEST speed switches (folded BN, channels-last, AMP, ...); the handle's autocast() is TEST.AMP's region.
    model, speed = prepare_for_inference(model.to(device), cfg, return_handle=True)
    classes = (info or {}).get("classes") if isinstance(info, dict) else None
    if not classes:
        n = cfg.MODEL.NUM_CLASSES
        classes = COCO_CLASSES if n == len(COCO_CLASSES) else ["__background__"] + [f"class {i}" for i in range(1, n)]
    names = {i: c for i, c in enumerate(classes)}
    os.makedirs(args.output_dir, exist_ok=True)
    for path in images:
        im = cv2.imread(path, cv2.IMREAD_COLOR)
        if im is None:
            print(f"skipping {path}: not a readable image", file=sys.stderr)
            continue
        with speed.autocast():  # im_detect_all calls the model's parts, not its forward
            cls_boxes, cls_segms, _ = im_detect_all(model, im)
        n = sum(len(b) for b in cls_boxes[1:])
        out = vis_one_image(im[:, :, ::-1], path, args.output_dir, cls_boxes, cls_segms, None, thresh=args.thresh,
                            box_alpha=0.8, dataset=names, show_class=True, ext="png", out_when_no_box=True)
        kept = sum(int((b[:, 4] >= args.thresh).sum()) for b in cls_boxes[1:])
        print(f"{path}: {n} detections, {kept} drawn (score >= {args.thresh}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
