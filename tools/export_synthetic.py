#!/usr/bin/env python
"""Write variants of the synthetic family as COCO-format json + PNG images (what a user's own data looks like).

    python tools/export_synthetic.py --variant tiny --out /data/synthetic_tiny      # train and val
    python tools/export_synthetic.py --list                                          # the variants

Each split goes to ``OUT/<split>/annotations.json`` and ``OUT/<split>/images/``; train on it with
``--dataset coco:OUT/train/annotations.json:OUT/train/images``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.data.datasets.synthetic_family import VARIANTS, SyntheticFamilyDataset  # noqa: E402
from maskrcnn.data.export_coco import export_coco  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), help="variant name")
    p.add_argument("--out", help="output folder")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument("--num_images", type=int, default=None, help="images per split (default: the variant's)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:8s} {'held out' if v.held_out else 'tuning  '}  {v.description}")
        return 0
    if not args.variant or not args.out:
        p.error("--variant and --out are required (or --list)")
    for split in args.splits:
        path = export_coco(SyntheticFamilyDataset(args.variant, split, num_images=args.num_images),
                           os.path.join(args.out, split))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
