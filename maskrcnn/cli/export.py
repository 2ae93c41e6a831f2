"""``maskrcnn-export``: export a trained Mask R-CNN to TorchScript, ONNX or ``torch.export``.

    maskrcnn-export --cfg CFG --load_ckpt WEIGHTS --format {torchscript,onnx,export} --output PATH \\
        [--input_dtype {uint8,float32}] [--paste_masks] [--example IMAGE] [--check IMAGE ...] [--set KEY VALUE ...]
        [--calib IMAGE ...]

The exported model takes one ``(3, H, W)`` RGB image of any size (``--format export``: sides of 32 to 4096
pixels, the range of its symbolic dimensions) and returns ``boxes (N, 4)``, ``labels (N,)``,
``scores (N,)`` and ``masks`` (``(N, 1, M, M)`` probabilities, or ``(N, 1, H, W)`` with ``--paste_masks``).
``--check`` runs the exported file (ONNX: in ONNX Runtime) on the given photos, compares it with the eager model
and prints the largest box and score differences and the smallest mask IoU; the exit status is 1 when they
exceed the tolerances (0.5 px, 1e-3, IoU 0.98). Exit status 2: bad arguments, config or files.

int8: ``--set TEST.QUANTIZE int8 --calib IMAGE ...`` quantizes the model, calibrated on those photos of your data,
and exports it to TorchScript (``--format torchscript`` only); ``--check`` then compares with the eager int8 model.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="maskrcnn-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="config: a YAML file or the name of a config shipped with the "
                                                "package (as in maskrcnn-train)")
    p.add_argument("--load_ckpt", required=True, help="checkpoint to export (any format load_ckpt reads)")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx", "export"),
                   help="torchscript (traced), onnx, or export (torch.export .pt2, which takes images whose "
                        "sides lie in 32..4096 pixels)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--input_dtype", default="uint8", choices=("uint8", "float32"),
                   help="input of the exported model: uint8 RGB 0..255 (default) or float32 RGB 0..1")
    p.add_argument("--paste_masks", action="store_true", help="output masks pasted into the image")
    p.add_argument("--example", help="image traced during export (default: noise at the test size)")
    p.add_argument("--check", nargs="+", default=[], metavar="IMAGE",
                   help="compare the exported model with the eager one on these images")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; >= 16)")
    p.add_argument("--calib", nargs="+", default=[], metavar="IMAGE",
                   help="with --set TEST.QUANTIZE int8: photos of your data to calibrate the int8 ranges")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


def _read_rgb(path: str, dtype):
    import cv2
    import torch

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"{path}: not a readable image")
    image = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).contiguous()
    return image if dtype == torch.uint8 else image.float() / 255.0


def _runner(fmt: str, path: str):
    """A callable image -> dict of outputs for the exported file."""
    import torch

    from ..export import OnnxRuntimeModel, load_program, load_torchscript

    if fmt == "onnx":
        return OnnxRuntimeModel(path)
    module = load_torchscript(path) if fmt == "torchscript" else load_program(path).module()

    def run(image):
        with torch.no_grad():
            outs = module(image)
        return dict(zip(("boxes", "labels", "scores", "masks"), outs))

    return run


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from ..config import ConfigError
    from ..export import INPUT_DTYPES, build_model_for_export, compare_detections, eager_detections, export_model
    from ..utils.checkpoint import CheckpointError

    if args.cfg is not None:
        # A file or a packaged config name, as maskrcnn-train / -test / -infer take it.
        from ..config.paths import resolve_config_path

        try:
            resolve_config_path(args.cfg)
        except ConfigError as e:
            print(f"--cfg {args.cfg}: {e}", file=sys.stderr)
            return 2
    for flag, path in [("--load_ckpt", args.load_ckpt), ("--example", args.example)] + [
            ("--check", c) for c in args.check] + [("--calib", c) for c in args.calib]:
        if path is not None and not os.path.isfile(path):
            print(f"{flag} {path}: file not found", file=sys.stderr)
            return 2
    if args.format == "onnx":
        import importlib.util

        # torch.onnx raises its own OnnxExporterError (a traceback) without the package; say what to install.
        missing = [m for m in ("onnx", "onnxruntime" if args.check else None) if m and importlib.util.find_spec(m) is None]
        if missing:
            print(f"maskrcnn-export: --format onnx needs {' and '.join(missing)}: pip install 'maskrcnn[onnx]'",
                  file=sys.stderr)
            return 2
    dtype = INPUT_DTYPES[args.input_dtype]
    try:
        model = build_model_for_export(args.cfg, args.load_ckpt, args.set)
        example = _read_rgb(args.example, dtype) if args.example else None
        if args.calib and not model.cfg.TEST.QUANTIZE:
            raise ValueError("--calib calibrates int8: it needs --set TEST.QUANTIZE int8")
        calib = [_read_rgb(c, INPUT_DTYPES["uint8"]) for c in args.calib]
        out = export_model(model, None, args.format, args.output, example=example, input_dtype=dtype,
                           paste_masks=args.paste_masks, opset_version=args.opset, calib_images=calib)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"maskrcnn-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}, input {args.input_dtype} (3, H, W) RGB)")
    aug = [name for name in ("BBOX_AUG", "MASK_AUG") if bool(model.cfg.TEST[name].ENABLED)]
    if aug:
        # test_net, Predictor and core.test run these extra passes; a traced graph holds one pass only.
        print(f"note: {' and '.join('TEST.' + a for a in aug)} (test-time augmentation, which train_net --auto "
              f"turns on) are not part of the exported model: it returns the plain run's detections at TEST.SCALE "
              f"{model.cfg.TEST.SCALE}, as test_net --set TEST.BBOX_AUG.ENABLED False TEST.MASK_AUG.ENABLED False does")
    if getattr(model, "mask_on", False) and not args.paste_masks:
        pre = model.preprocess
        how = (f"method={pre.mask_paste_method!r}" if pre.mask_paste_method == "detectron2"
               else f"method='torchvision', padding={pre.mask_paste_padding}")
        print(f"masks: (N, 1, M, M) probabilities; paste them with maskrcnn.export.paste_masks(masks, boxes, "
              f"(H, W), {how}) (the model's TEST.MASK_PASTE_METHOD)")
    ok = True
    if args.check:
        run = _runner(args.format, out)
        for path in args.check:
            image = _read_rgb(path, dtype)
            try:
                exported = run(image)
            except Exception as e:  # a guard of the traced shapes, or the runtime's own error: a failed check
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                print(f"check {os.path.basename(path)}: the exported model cannot run this {tuple(image.shape[-2:])} "
                      f"image: {type(e).__name__}: {first}" + (
                          "  (a .pt2 holds for the shapes its example traced: see maskrcnn.export.torch_export; "
                          "--format torchscript takes any size)" if args.format == "export" else ""), file=sys.stderr)
                ok = False
                continue
            diff = compare_detections(eager_detections(model, image), exported, image_size=image.shape[-2:],
                                      mask_padding=model.preprocess.mask_paste_padding,
                                      mask_paste_method=model.preprocess.mask_paste_method)
            ok &= diff.within()
            print(f"check {os.path.basename(path)}: {diff}{'' if diff.within() else '  <-- outside tolerance'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
