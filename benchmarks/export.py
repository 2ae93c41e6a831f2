"""Inference speed of the exported model in each CPU runtime, against our eager model and torchvision's.

    python benchmarks/export.py [--repeats 5] [--threads N] [--json OUT] [--skip openvino-bf16,...]

One R-50-FPN Mask R-CNN (torchvision's layout, seeded BN-calibrated weights, ``common.build_torchvision``; ours
holds the converted weights) on one PennFudanPed photo resized to 800x1066, score threshold 0 (100 detections
with masks everywhere). Timed, alternating in every round after a warm-up:

* ``ours eager fp32`` / ``ours eager bf16``: ``Generalized_RCNN`` with ``prepare_for_inference``'s defaults
  (FrozenBN folded, oneDNN conv+ReLU fusion, channels-last; bf16: plus bf16 autocast); input float RGB.
* ``ours torchscript``: the traced :class:`~maskrcnn.export.ExportableMaskRCNN` (FrozenBN folded, frozen with
  ``torch.jit.freeze``); input uint8 RGB.
* ``onnxruntime``, ``openvino fp32``, ``openvino bf16``: the ONNX export in ONNX Runtime / OpenVINO (CPU plugin,
  ``INFERENCE_PRECISION_HINT``; bf16 falls back to f32 on CPUs without AVX512-BF16/AMX); input uint8 RGB.
* ``torchvision plain`` / ``channels-last`` / ``bf16 autocast + channels-last``: ``maskrcnn_resnet50_fpn``'s
  architecture in its own eager settings; input float RGB.

Every exported runtime returns ``M x M`` mask probabilities; its timed call includes pasting them into the image
(:func:`maskrcnn.export.paste_masks`), as the eager models paste theirs. The table reports the median, the spread
(min-max) and ``ratio = median / torchvision's best median`` (below 1: faster than torchvision at its best). The
JSON output records the git commit and the machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import torch  # noqa: E402

TV_SETTINGS = common.TV_SETTINGS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (>= 5 for the docs table)")
    p.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: each one's own)")
    p.add_argument("--skip", default="", help="comma-separated names of runs to leave out")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build_runs(args, tmp: str) -> Dict[str, Callable[[], Any]]:
    from maskrcnn.engine.speed import prepare_for_inference
    from maskrcnn.export import ExportableMaskRCNN, OnnxRuntimeModel, OpenVINOModel, paste_masks, trace_torchscript
    from maskrcnn.export.onnx import export_onnx

    image = common.load_image(common.IMAGE_SIZE)  # (3, 800, 1066) float RGB in [0, 1]
    image_u8 = (image * 255).round().to(torch.uint8)
    size = common.resize_setting(common.IMAGE_SIZE)
    tv = common.build_torchvision(size=size)
    ours = common.build_ours(tv, size=size)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    threads = args.threads or 0
    runs: Dict[str, Callable[[], Any]] = {}

    fp32 = common.prepared(copy.deepcopy(ours), "fp32")
    bf16 = common.prepared(copy.deepcopy(ours), "bf16")
    runs["ours eager fp32"] = lambda: fp32([image])
    runs["ours eager bf16"] = lambda: bf16([image])

    # Exported graphs hold plain modules: FrozenBN folded into the convs (ONNX Runtime / OpenVINO fold it
    # themselves anyway), no oneDNN-specific fused modules.
    plain = prepare_for_inference(copy.deepcopy(ours), fold_bn=True, fuse_activations=False, channels_last=False,
                                  amp="", compile_body=False)
    wrapper = ExportableMaskRCNN(plain, input_dtype=torch.uint8)
    hw = tuple(image.shape[-2:])

    def pasted(run):
        def call():
            out = run(image_u8)
            return paste_masks(out["masks"], out["boxes"], hw)
        return call

    if "ours torchscript" not in skip:
        traced = torch.jit.freeze(trace_torchscript(wrapper, image_u8).eval())

        def ts(img):
            with torch.no_grad():
                b, lab, s, m = traced(img)
            return {"boxes": b, "labels": lab, "scores": s, "masks": m}
        runs["ours torchscript"] = pasted(ts)
    onnx_path = os.path.join(tmp, "model.onnx")
    if not {"onnxruntime", "openvino fp32", "openvino bf16"} <= skip:
        export_onnx(wrapper, image_u8, onnx_path)
    if "onnxruntime" not in skip:
        runs["onnxruntime"] = pasted(OnnxRuntimeModel(onnx_path, num_threads=threads))
    for prec, name in (("f32", "openvino fp32"), ("bf16", "openvino bf16")):
        if name not in skip:
            runs[name] = pasted(OpenVINOModel(onnx_path, precision=prec, num_threads=threads))

    runs.update(common.torchvision_settings(tv, lambda m: m([image])))
    return {k: v for k, v in runs.items() if k not in skip}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unsupported: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        runs = build_runs(args, tmp)
        # The warm-up call of each run; a run this CPU cannot execute (e.g. oneDNN bf16 convolutions need
        # AVX512-BF16 or AVX-NE-CONVERT) is reported as unsupported instead of stopping the benchmark.
        for name in list(runs):
            try:
                runs[name]()
            except RuntimeError as e:
                unsupported[name] = str(e).splitlines()[0]
                del runs[name]
        times = common.alternate(runs, repeats=args.repeats, warmup=0)
    medians = {k: common.median(v) for k, v in times.items()}
    tv_best_name = min((k for k in TV_SETTINGS if k in medians), key=lambda k: medians[k])
    tv_best = medians[tv_best_name]
    rows = []
    print(f"image {common.image_source()} {common.IMAGE_SIZE[0]}x{common.IMAGE_SIZE[1]}, {args.repeats} alternated "
          f"rounds; ratio = median / {tv_best_name} ({tv_best * 1e3:.0f} ms)")
    print(f"{'run':34s} {'median ms':>10s} {'min-max ms':>16s} {'ratio':>7s}")
    for k, v in sorted(times.items(), key=lambda kv: medians[kv[0]]):
        rows.append({"run": k, "median_s": medians[k], "min_s": min(v), "max_s": max(v),
                     "ratio": medians[k] / tv_best, "times_s": v})
        print(f"{k:34s} {medians[k] * 1e3:10.0f} {min(v) * 1e3:7.0f}-{max(v) * 1e3:<8.0f} "
              f"{medians[k] / tv_best:7.2f}")
    for k, why in unsupported.items():
        print(f"{k:34s} {'unsupported on this CPU':>10s}: {why}")
    result = {"benchmark": "export", "commit": common.git_commit(), "machine": common.machine_info(),
              "image": common.image_source(), "image_size": list(common.IMAGE_SIZE), "repeats": args.repeats,
              "threads": args.threads, "torchvision_best": tv_best_name, "rows": rows,
              "unsupported": unsupported}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"commit": result["commit"], "torchvision_best": tv_best_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
