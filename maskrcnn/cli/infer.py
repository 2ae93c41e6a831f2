"""Run a trained model on images and write one picture per image with masks, boxes, class names and scores
(``tools/infer_simple.py`` is a shim over this module).

    python tools/infer_simple.py --cfg CFG --load_ckpt MODEL.pth (--images a.jpg b.png | --image_dir DIR) \\
        --output_dir OUT [--thresh 0.7] [--set KEY VALUE ...] [--no_cuda]

Built on :class:`maskrcnn.Predictor`: any weight format ``load_ckpt`` reads, the config's inference speed features,
``TEST.AMP``, and lists run in batches of ``TEST.IMS_PER_BATCH``. Without ``--cfg`` the config saved in the
checkpoint is used. Class names come from the checkpoint (``classes``) when present, else from the COCO list when
the model has 81 or 91 classes, else "class k". Pictures are ``OUT/<image name>.png`` (``OUT/<image
name>_<ext>.png`` where two images share a name or the picture would overwrite an image: :func:`output_paths`).
An unreadable image is reported and skipped.

Exit status: 0 done, 1 the weights cannot be read or do not fit the config, 2 bad config or command line (errors
are one ``error: ...`` line, no traceback).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "parse_args", "list_images", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="config file (default: the config saved in the checkpoint)")
    p.add_argument("--load_ckpt", required=True, help="weights to load (ours, Detectron, torchvision, detectron2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--image_dir", help="folder of images")
    p.add_argument("--output_dir", required=True, help="where the pictures are written")
    p.add_argument("--thresh", type=float, default=0.7, help="score threshold for drawing")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--no_cuda", action="store_true", help="run on the CPU even if CUDA is available")
    return p.parse_args(argv)


def list_images(image_dir: str) -> List[str]:
    """The image files (by extension, :data:`IMAGE_EXTS`) directly in ``image_dir``, sorted by name."""
    return sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTS))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from ..config import ConfigError
    from ..engine.launch import run_then_shutdown
    from ..utils.checkpoint import CheckpointError

    if args.image_dir:
        if not os.path.isdir(args.image_dir):
            print(f"--image_dir {args.image_dir}: not a folder", file=sys.stderr)
            return 2
        images = list_images(args.image_dir)
    else:
        images = args.images
    missing = [f for f in images if not os.path.isfile(f)]
    if missing:
        print(f"image files not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    return run_then_shutdown(lambda: _draw_all(args, images), usage_errors=(ConfigError,),
                             run_errors=(CheckpointError,))


def output_paths(images: List[str], output_dir: str) -> Dict[str, str]:
    """The picture each image is drawn to: ``OUT/<name>.png``, or, where that name is taken (``a.jpg`` and
    ``a.png``; the same name in two folders) or would overwrite one of the images themselves (``--output_dir`` the
    image folder), ``OUT/<name>_<ext>.png``, then ``OUT/<name>_<ext>_<k>.png``: no picture overwrites another
    or an input."""
    inputs = {os.path.realpath(p) for p in images}
    taken: set = set()
    out: Dict[str, str] = {}
    for path in images:
        stem, ext = os.path.splitext(os.path.basename(path))
        tagged = f"{stem}_{ext.lstrip('.') or 'image'}"
        for name in itertools.chain([stem, tagged], (f"{tagged}_{k}" for k in itertools.count(2))):
            target = os.path.join(output_dir, name + ".png")
            real = os.path.realpath(target)
            if real not in taken and real not in inputs:
                break
        taken.add(real)
        out[path] = target
    return out


def _draw_all(args: argparse.Namespace, images: List[str]) -> int:
    import cv2
    import torch

    from .. import Predictor
    from ..data.transforms import read_image_rgb
    from ..utils.vis import draw_instances, draw_keypoints

    predictor = Predictor(args.cfg, args.load_ckpt, overrides=args.set, device="cpu" if args.no_cuda else None)
    mask_thresh = float(predictor.cfg.MRCNN.THRESH_BINARIZE)
    os.makedirs(args.output_dir, exist_ok=True)
    targets = output_paths(images, args.output_dir)

    def run(paths: List[str], rgbs: list) -> None:
        for path, rgb, det in zip(paths, rgbs, predictor(rgbs, format="RGB")):
            masks = list((det["masks"][:, 0] > mask_thresh).numpy()) if "masks" in det else None
            drawn = draw_instances(rgb, det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy(), masks,
                                   class_names=predictor.class_names, thresh=args.thresh, box_alpha=0.8)
            if "keypoints" in det and "keypoints_scores" in det:
                # x, y and the heatmap logit (Detectron's kp_thresh 2 applies to it) of the drawn detections.
                kps = torch.cat([det["keypoints"][..., :2], det["keypoints_scores"][..., None]], -1)
                drawn = draw_keypoints(drawn, kps[det["scores"] >= args.thresh].numpy())
            out = targets[path]
            if not cv2.imwrite(out, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {out}")
            kept = int((det["scores"] >= args.thresh).sum())
            print(f"{path}: {len(det['scores'])} detections, {kept} drawn (score >= {args.thresh}) -> {out}")

    paths, rgbs = [], []
    for path in images:
        try:
            rgb = read_image_rgb(path)
        except OSError as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        paths.append(path)
        rgbs.append(rgb)
        if len(rgbs) == predictor.batch_size:
            run(paths, rgbs)
            paths, rgbs = [], []
    if rgbs:
        run(paths, rgbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
