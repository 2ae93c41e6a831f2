"""Native ops vs torchvision's compiled kernels: median wall times and their ratio.

    python benchmarks/ops.py [--quick] [--threads N] [--device cpu|cuda]

Each row times the native implementation (``maskrcnn.ops`` under ``use_backend("native")``) and the
torchvision kernel on the same inputs, alternating the two after a warm-up, and prints the median of
each and ``ratio = native / torchvision`` (< 1: native is faster). Workloads are Mask R-CNN shaped:
one 800x1088 image, FPN maps P2..P5 (200x272 .. 25x34) with 256 channels, 1000 proposal-like RoIs
(log-uniform sides 16..600 px, clipped to the image), NMS over RPN-like proposals, and the
1-channel 28x28 RoIAlign of ground-truth masks that builds mask-head targets.

The native ops are sequences of multithreaded PyTorch kernels, torchvision's CPU kernels are single
threaded loops. On a machine whose cores are shared with other busy processes, OpenMP threads that
spin-wait at every kernel boundary make the native timings several times worse; measure there with
``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``.
"""

import argparse
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from typing import Callable, List, Tuple

import torch
import torchvision

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from maskrcnn.ops._backend import use_backend  # noqa: E402
from maskrcnn.ops.nms import nms  # noqa: E402
from maskrcnn.ops.poolers import MultiLevelRoIAlign  # noqa: E402
from maskrcnn.ops.roi_align import roi_align  # noqa: E402
from maskrcnn.ops.roi_pool import roi_pool  # noqa: E402

IMAGE = (800, 1088)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
NAMES = ["p2", "p3", "p4", "p5"]


def proposals(num: int, device: str, generator: torch.Generator) -> torch.Tensor:
    """(num, 4) boxes with log-uniform sides in [16, 600] px and aspect jitter, clipped to IMAGE."""
    h, w = IMAGE
    side = torch.exp(torch.rand(num, generator=generator) * math.log(600 / 16)) * 16
    aspect = torch.exp(torch.randn(num, generator=generator) * 0.5)
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(num, generator=generator) * w, torch.rand(num, generator=generator) * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes.to(device)


def clustered_boxes(num: int, device: str, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """RPN-like NMS input: boxes jittered around ~num/20 objects, so many overlap, random scores."""
    centres = proposals(max(num // 20, 1), "cpu", generator)
    pick = torch.randint(0, centres.shape[0], (num,), generator=generator)
    size = (centres[pick, 2:] - centres[pick, :2]).clamp(min=8)
    jitter = torch.randn(num, 4, generator=generator) * size.repeat(1, 2) * 0.15
    boxes = centres[pick] + jitter
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:]) + 1], 1)
    return boxes.to(device), torch.rand(num, generator=generator).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(native: Callable, reference: Callable, repeats: int, device: str) -> Tuple[float, float]:
    """Median seconds of ``native`` and ``reference``, run alternately after one warm-up each."""
    for fn in (native, reference):
        fn()
    sync(device)
    times: List[List[float]] = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((native, reference)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def forward_backward(op: Callable, features: List[torch.Tensor]) -> Callable:
    def run():
        for f in features:
            f.grad = None
        out = op()
        out.backward(torch.ones_like(out))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and workloads")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    repeats = 3 if args.quick else 7
    gen = torch.Generator().manual_seed(0)

    rows: List[Tuple[str, float, float]] = []

    def record(name: str, native: Callable, reference: Callable, reps: int = repeats) -> None:
        t_native, t_ref = time_pair(native, reference, reps, device)
        rows.append((name, t_native, t_ref))
        print(f"{name:<54} {t_native * 1e3:10.1f} {t_ref * 1e3:12.1f} {t_native / t_ref:8.2f}", flush=True)

    versions = f"torch={torch.__version__} torchvision={torchvision.__version__}"
    print(f"device={device} threads={torch.get_num_threads()} {versions}")
    print(f"{'workload':<54} {'native ms':>10} {'torchvision':>12} {'ratio':>8}")

    for num in [1000, 5000] if args.quick else [1000, 5000, 12000]:
        boxes, scores = clustered_boxes(num, device, gen)

        def native_nms(boxes=boxes, scores=scores):
            with use_backend("native"):
                return nms(boxes, scores, 0.7)

        record(f"nms {num} boxes (iou 0.7)", native_nms, lambda b=boxes, s=scores: torchvision.ops.nms(b, s, 0.7))

    h, w = IMAGE
    feats = [torch.randn(1, 256, h // int(1 / s), w // int(1 / s), generator=gen).to(device) for s in SCALES]
    boxes = proposals(1000, device, gen)
    rois = torch.cat([torch.zeros(1000, 1, device=device), boxes], 1)
    p2 = feats[0]
    p2_grad = p2.clone().requires_grad_()
    feats_grad = [f.clone().requires_grad_() for f in feats]

    align_cases = [(7, 2), (14, 2), (7, 0)] if not args.quick else [(7, 2), (14, 2)]
    for size, ratio in align_cases:
        def native_fwd(size=size, ratio=ratio):
            with use_backend("native"):
                return roi_align(p2, rois, size, 0.25, ratio)

        def native_op(size=size, ratio=ratio):
            with use_backend("native"):
                return roi_align(p2_grad, rois, size, 0.25, ratio)

        label = f"roi_align P2 1000x256 {size}x{size} sr={ratio}"
        record(label + " fwd", native_fwd, lambda s=size, r=ratio: torchvision.ops.roi_align(p2, rois, s, 0.25, r))
        record(
            label + " fwd+bwd",
            forward_backward(native_op, [p2_grad]),
            forward_backward(lambda s=size, r=ratio: torchvision.ops.roi_align(p2_grad, rois, s, 0.25, r), [p2_grad]),
            reps=max(repeats // 2, 2),
        )

    for size, ratio in [(7, 2), (14, 2), (7, 0)] if not args.quick else [(7, 2)]:
        ours = MultiLevelRoIAlign(size, SCALES, ratio)
        tv = torchvision.ops.MultiScaleRoIAlign(NAMES, size, ratio)

        def native_ml(ours=ours, fs=feats):
            with use_backend("native"):
                return ours(fs, [boxes])

        def tv_ml(tv=tv, fs=feats):
            return tv(OrderedDict(zip(NAMES, fs)), [boxes], [IMAGE])

        label = f"MultiLevelRoIAlign P2-P5 1000x256 {size}x{size} sr={ratio}"
        record(label + " fwd", native_ml, tv_ml)
        record(
            label + " fwd+bwd",
            forward_backward(lambda o=ours: native_ml(o, feats_grad), feats_grad),
            forward_backward(lambda t=tv: tv_ml(t, feats_grad), feats_grad),
            reps=max(repeats // 2, 2),
        )

    # Mask-head targets (maskrcnn.ops.masks.project_masks_on_boxes): 1 channel, 28x28, adaptive.
    masks = (torch.rand(15, 1, h, w, generator=gen) > 0.5).float().to(device)
    mask_rois = torch.cat([torch.randint(0, 15, (256, 1), generator=gen).float().to(device), boxes[:256]], 1)

    def native_masks():
        with use_backend("native"):
            return roi_align(masks, mask_rois, 28, 1.0, 0)

    record(
        "roi_align masks 15x1x800x1088 256x28x28 sr=0 fwd",
        native_masks,
        lambda: torchvision.ops.roi_align(masks, mask_rois, 28, 1.0, 0),
    )

    def native_pool():
        with use_backend("native"):
            return roi_pool(p2, rois, 7, 0.25)

    record("roi_pool P2 1000x256 7x7 fwd", native_pool, lambda: torchvision.ops.roi_pool(p2, rois, 7, 0.25))

    def native_pool_grad():
        with use_backend("native"):
            return roi_pool(p2_grad, rois, 7, 0.25)

    record(
        "roi_pool P2 1000x256 7x7 fwd+bwd",
        forward_backward(native_pool_grad, [p2_grad]),
        forward_backward(lambda: torchvision.ops.roi_pool(p2_grad, rois, 7, 0.25), [p2_grad]),
        reps=max(repeats // 2, 2),
    )

    worst = max(rows, key=lambda r: r[1] / r[2])
    print(f"\nworst ratio native/torchvision: {worst[1] / worst[2]:.2f} ({worst[0]})")


if __name__ == "__main__":
    main()
