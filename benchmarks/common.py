"""Shared pieces of the model benchmarks: the two models with the same weights, the input image, alternated timing,
peak memory, FLOP counts and this machine's matmul peak.

Weights. torchvision's ``maskrcnn_resnet50_fpn`` layout (FrozenBN everywhere, stem and res2 frozen, 91 classes) with
seeded random weights: convolutions and heads keep torchvision's initialisation, and the FrozenBN statistics are
calibrated on the benchmark image (each BN's mean and variance are those of its input in one forward pass, its
affine weight/bias drawn from U(0.8, 1.2) / U(-0.1, 0.1), U(0.1, 0.3) for the weight of the BN closing each residual
branch), so activations stay O(1) and perturbations are not amplified through the 50 layers, as
with trained weights (no overflow, no denormals); the class and objectness logit layers are scaled by
``LOGIT_SCALE`` so that scores spread out as with trained weights instead of all sitting near 1/91. Our model loads the very same tensors through
``maskrcnn.utils.weights.formats.convert_to_ours(state_dict, "torchvision", cfg)``.

Memory. Peak resident set size (``VmHWM`` in ``/proc/self/status``) of a fresh child process per model, after
resetting the high-water mark (``/proc/self/clear_refs``) once the model and input are built and one warm-up run
is done; the figure is the peak minus the resident size at the reset, i.e. what the measured run adds on top of
the weights. CPU tensors come from the system allocator, so this is the memory the process really asked for.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

TORCHVISION_CFG = os.path.join(ROOT, "configs", "torchvision", "e2e_mask_rcnn_R-50-FPN.yaml")
PENNFUDAN = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "PennFudanPed-sample", "PNGImages"))
IMAGE_SIZE = (800, 1066)
LOGIT_SCALE = 10.0
QUICK_IMAGE_SIZE = (480, 640)


def resize_setting(image_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(min_size, max_size)`` for both models' resizing so that an ``image_size`` input is used as it is:
    torchvision's defaults (800, 1333) for the full size, the image's own sides for smaller (``--quick``) ones."""
    if tuple(image_size) == IMAGE_SIZE:
        return 800, 1333
    return min(image_size), max(image_size)


# --- inputs ---------------------------------------------------------------------------------------------------------
def load_image(size: Tuple[int, int] = IMAGE_SIZE, source: str = "auto", index: int = 0) -> torch.Tensor:
    """``(3, h, w)`` float RGB in [0, 1]: a PennFudanPed photo resized (bilinear) to ``size`` when the shared data is
    there (``source`` 'auto' or 'pennfudan'), else (or with 'synthetic') a seeded random image of smooth blobs."""
    import cv2

    h, w = size
    if source in ("auto", "pennfudan") and os.path.isdir(PENNFUDAN):
        names = sorted(n for n in os.listdir(PENNFUDAN) if n.lower().endswith(".png"))
        if names:
            bgr = cv2.imread(os.path.join(PENNFUDAN, names[index % len(names)]), cv2.IMREAD_COLOR)
            rgb = cv2.cvtColor(cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
            return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0).contiguous()
    if source == "pennfudan":
        raise FileNotFoundError(f"no PennFudanPed images under {PENNFUDAN}")
    rng = np.random.default_rng(index)
    small = rng.random((3, max(h // 32, 2), max(w // 32, 2))).astype(np.float32)
    img = cv2.resize(small.transpose(1, 2, 0), (w, h), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(np.clip(img, 0, 1)).permute(2, 0, 1).contiguous()


def image_source() -> str:
    return "PennFudanPed (resized)" if os.path.isdir(PENNFUDAN) else "synthetic"


def synthetic_targets(image: torch.Tensor, num: int = 4, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``num`` random boxes (labels 1..90) with rectangular masks inside an image, for the training benchmark."""
    g = torch.Generator().manual_seed(seed)
    h, w = image.shape[-2:]
    boxes, masks = [], torch.zeros(num, h, w, dtype=torch.uint8)
    for i in range(num):
        bw, bh = float(w) * (0.15 + 0.3 * torch.rand(1, generator=g).item()), float(h) * (
            0.2 + 0.4 * torch.rand(1, generator=g).item())
        x1, y1 = (w - bw) * torch.rand(1, generator=g).item(), (h - bh) * torch.rand(1, generator=g).item()
        boxes.append([x1, y1, x1 + bw, y1 + bh])
        masks[i, int(y1):int(y1 + bh), int(x1):int(x1 + bw)] = 1
    labels = torch.randint(1, 91, (num,), generator=g)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels, "masks": masks}


# --- models ---------------------------------------------------------------------------------------------------------
def build_torchvision(seed: int = 0, score_thresh: float = 0.0, calib_image: Optional[torch.Tensor] = None,
                      size: Tuple[int, int] = (800, 1333)) -> nn.Module:
    """torchvision ``MaskRCNN`` exactly as ``maskrcnn_resnet50_fpn`` builds it with pretrained weights (FrozenBN,
    ``trainable_backbone_layers=3``), with seeded random weights and calibrated BN (module docstring).
    ``size``: ``(min_size, max_size)`` of its resizing transform (torchvision's default 800, 1333)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = MaskRCNN(backbone, num_classes=91, box_score_thresh=score_thresh, min_size=size[0], max_size=size[1])
    calib = calib_image if calib_image is not None else load_image(QUICK_IMAGE_SIZE)
    _calibrate_frozen_bn(model, calib, seed)
    with torch.no_grad():
        # Larger class and objectness logits than the initialisation's (as trained weights have), so that the
        # kept proposals and the 100 detections are not decided among near-equal scores.
        model.roi_heads.box_predictor.cls_score.weight.mul_(LOGIT_SCALE)
        model.rpn.head.cls_logits.weight.mul_(LOGIT_SCALE)
    return model.eval()


@torch.no_grad()
def _calibrate_frozen_bn(model: nn.Module, image: torch.Tensor, seed: int) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    residual_ends = {id(m) for name, m in model.backbone.body.named_modules() if name.endswith(".bn3")}
    for bn in bns:
        n = bn.weight.numel()
        # Residual branches end small (as in trained ResNets), so that the stack of 16 blocks stays well
        # conditioned: with unit gains every stage would amplify rounding differences about threefold.
        low, high = (0.1, 0.3) if id(bn) in residual_ends else (0.8, 1.2)
        bn.weight.copy_(low + (high - low) * torch.rand(n, generator=g))
        bn.bias.copy_(-0.1 + 0.2 * torch.rand(n, generator=g))

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
    try:
        model.eval()
        images, _ = model.transform([image])
        model.backbone.body(images.tensors)
    finally:
        for h in handles:
            h.remove()


def ours_cfg(score_thresh: float = 0.0, size: Tuple[int, int] = (800, 1333), opts: Sequence[Any] = ()):
    from maskrcnn.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(TORCHVISION_CFG)
    cfg.merge_from_list(["TEST.SCORE_THRESH", score_thresh, "TEST.SCALE", size[0], "TEST.MAX_SIZE", size[1],
                         "TRAIN.SCALES", (size[0],), "TRAIN.MAX_SIZE", size[1]] + list(opts))
    return cfg


def build_ours(tv_model: nn.Module, score_thresh: float = 0.0, size: Tuple[int, int] = (800, 1333),
               opts: Sequence[Any] = ()) -> nn.Module:
    """Our ``Generalized_RCNN`` from ``configs/torchvision/e2e_mask_rcnn_R-50-FPN.yaml`` holding ``tv_model``'s
    weights (converted, strict load); ``size`` = ``(min_size, max_size)`` for test and training resizing."""
    from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
    from maskrcnn.utils.weights.formats import convert_to_ours

    cfg = ours_cfg(score_thresh, size, opts)
    model = Generalized_RCNN(cfg)
    sd, _ = convert_to_ours(tv_model.state_dict(), "torchvision", cfg, model=model)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def prepared(model: nn.Module, mode: str, calib_images: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """``model`` with the inference speed features of ``mode``: 'plain' (none), 'fp32' (config defaults, fp32),
    'bf16' (config defaults + TEST.AMP bf16), 'int8' (config defaults + TEST.QUANTIZE int8, calibrated on
    ``calib_images``: ``(3, H, W)`` float images other than the timed ones)."""
    from maskrcnn.engine.speed import prepare_for_inference

    if mode == "plain":
        return prepare_for_inference(model, fold_bn=False, fuse_activations=False, channels_last=False,
                                     amp="", compile_body=False)
    if mode == "fp32":
        return prepare_for_inference(model, fold_bn=True, fuse_activations=True, channels_last=True, amp="")
    if mode == "bf16":
        return prepare_for_inference(model, fold_bn=True, fuse_activations=True, channels_last=True, amp="bf16")
    if mode == "int8":
        return prepare_for_inference(model, fold_bn=True, channels_last=True, amp="", quantize="int8",
                                     calib_images=calib_images)
    raise ValueError(f"mode must be 'plain', 'fp32', 'bf16' or 'int8', got {mode!r}")


# --- timing ---------------------------------------------------------------------------------------------------------
def alternate(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Wall times of each callable, run round-robin ``repeats`` times after ``warmup`` rounds; the order within a
    round rotates so that no callable always follows the same one. Stops early (at least 2 rounds) once
    ``budget_s`` seconds have passed."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
            # Printed as it goes: a run stopped part-way (a timeout on a loaded machine) still leaves its figures.
            print(f"round {r + 1}/{repeats}: {n} {times[n][-1]:.3f} s", flush=True)
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --- machine --------------------------------------------------------------------------------------------------------
def matmul_runner(dtype: torch.dtype = torch.float32, n: int = 4096, m: Optional[int] = None,
                  k: Optional[int] = None) -> Callable[[], Any]:
    """A callable running one ``(m, k)`` by ``(k, n)`` matmul in ``dtype`` (``2 m k n`` FLOPs; ``m`` and ``k``
    default to ``n``; ``torch.int8``: ``torch._int_mm``, int32 sums), run once here, to time alongside the models so
    that the peak is measured under the same conditions as they are."""
    m, k = m or n, k or n
    if dtype == torch.int8:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 127, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 127, (k, n), generator=g, dtype=torch.int8)
        mm = torch._int_mm
    else:
        a, b, mm = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), torch.mm
    mm(a, b)
    return lambda: mm(a, b)


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5, m: Optional[int] = None,
                k: Optional[int] = None) -> float:
    """GFLOP/s (GOP/s for int8) of an ``(m, k)`` by ``(k, n)`` matmul in ``dtype`` (square ``n`` by default) on
    this machine's threads: the best of ``repeats`` (a peak; slower repeats were disturbed by other processes)."""
    m, k = m or n, k or n
    run = matmul_runner(dtype, n, m, k)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return 2.0 * m * k * n / min(ts) / 1e9


#: The convolution probe's geometry (H, W, C_in, C_out, k): the FPN output / RPN 3x3 convolution on P2 at
#: 800x1066, R-50-FPN's largest single layer (64 GFLOP per image).
CONV_PROBE = (200, 272, 256, 256, 3)


def conv_runner(dtype: torch.dtype = torch.float32, geometry: Tuple[int, int, int, int, int] = CONV_PROBE
                ) -> Tuple[Callable[[], Any], float]:
    """A callable running one channels-last ``k x k`` convolution (stride 1, ``k // 2`` padding, batch 1) of
    ``geometry`` = (H, W, C_in, C_out, k) with the kernels the models use, and its FLOPs (``2 H W C_in C_out k^2``):
    oneDNN's for fp32 and bf16, the x86 quantized engine's for ``torch.int8`` (a ``torch.ao.nn.quantized.Conv2d``
    on a quint8 input, as ``TEST.QUANTIZE int8`` runs it; operations counted as FLOPs). Run once here.

    A second peak next to :func:`matmul_runner`'s: ``torch.mm`` in fp32 goes to MKL, which on some CPUs (AMD's)
    takes a slower code path than oneDNN's convolution kernels (on a 2-core AMD EPYC: fp32 4096^3 mm 190 GFLOP/s,
    this convolution 218; bf16 391 against 463), so the models' fraction of the peak is taken against the best of
    both."""
    import warnings

    h, w, cin, cout, k = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    if dtype == torch.int8:
        import torch.ao.nn.quantized as nnq

        from maskrcnn.engine.quantize import quantized_engine

        torch.backends.quantized.engine = quantized_engine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized tensor creation is deprecated, still what runs
            conv = nnq.Conv2d(cin, cout, k, padding=k // 2)
            scales = weight.abs().amax((1, 2, 3)) / 127
            conv.set_weight_bias(torch.quantize_per_channel(weight, scales, torch.zeros(cout, dtype=torch.long), 0,
                                                            torch.qint8), None)
            conv.scale, conv.zero_point = 0.05, 0
            xq = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)

        def run():
            return conv(xq)
    else:
        xd = x.to(dtype)
        wd = weight.to(dtype).contiguous(memory_format=torch.channels_last)

        def run():
            return torch.nn.functional.conv2d(xd, wd, padding=k // 2)
    run()
    return run, 2.0 * h * w * cin * cout * k * k


def add_peak_probes(fns: Dict[str, Callable[[], Any]], dtypes: Dict[str, torch.dtype]) -> Dict[str, float]:
    """Add the two peak probes of each ``dtypes`` entry (``matmul-NAME``: :func:`matmul_runner`, ``conv-NAME``:
    :func:`conv_runner`) to ``fns``, to be timed in the same alternated rounds as the models; returns the
    convolution probes' FLOPs by name (for :func:`pop_peaks`)."""
    conv_flops: Dict[str, float] = {}
    for name, dt in dtypes.items():
        fns[f"matmul-{name}"] = matmul_runner(dt)
        fns[f"conv-{name}"], conv_flops[name] = conv_runner(dt)
    return conv_flops


def pop_peaks(times: Dict[str, List[float]], conv_flops: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """Remove the probes :func:`add_peak_probes` added from ``times`` and return, by name, their best rates:
    ``{"matmul", "conv", "peak"}`` in GFLOP/s (GOP/s for int8), the peak the better of the two."""
    out: Dict[str, Dict[str, float]] = {}
    for name, flops in conv_flops.items():
        mm = 2.0 * 4096 ** 3 / min(times.pop(f"matmul-{name}")) / 1e9
        conv = flops / min(times.pop(f"conv-{name}")) / 1e9
        out[name] = {"matmul": mm, "conv": conv, "peak": max(mm, conv)}
    return out


def compute_peak(dtype: torch.dtype = torch.float32, repeats: int = 3) -> Dict[str, float]:
    """This machine's peak in ``dtype`` as GFLOP/s (GOP/s for int8): ``{"matmul": the 4096^3 product,
    "conv": the convolution probe (:func:`conv_runner`), "peak": the better of the two}``, each the best of
    ``repeats`` after one call."""
    out = {"matmul": matmul_peak(dtype, repeats=repeats)}
    run, flops = conv_runner(dtype)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    out["conv"] = flops / min(ts) / 1e9
    out["peak"] = max(out["matmul"], out["conv"])
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls and convolutions:
    RoIAlign, NMS and elementwise work count nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_info() -> Dict[str, Any]:
    from maskrcnn.utils.env import cpu_flags

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(load, 2),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        # What decides the bf16 and int8 figures: native bf16 (AVX512-BF16, AMX) and int8 dot products (VNNI, AMX).
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                                           "amx_int8", "amx_tile"}),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


# --- memory ---------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{key} not found in /proc/self/status")
    return int(m.group(1))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS (bytes) since the last :func:`reset_peak_rss` (or since the process started)."""
    return _status_kib("VmHWM") * 1024


def measure_peak_memory(fn: Callable[[], Any]) -> int:
    """Bytes the peak RSS rises above the current RSS during one ``fn()`` call (run a warm-up before)."""
    base = reset_peak_rss()
    fn()
    return peak_rss() - base


def child_env() -> Dict[str, str]:
    """Environment of the memory-measuring children. glibc raises its mmap threshold each time a large block is
    freed, after which large tensors come from the heap, where freed space is kept and fragments: the same step
    then shows peak RSS differing by 100 MiB from run to run. A fixed 64 KiB threshold gives every tensor of
    that size its own mapping, returned on free, so the peak RSS tracks the peak of live tensors."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def run_child(script: str, args: Sequence[str], timeout: float = 600, fixed_mmap: bool = True) -> Dict[str, Any]:
    """Run ``python benchmarks/<script> <args>`` in a fresh process (with glibc's mmap threshold fixed, as the
    memory figures need, unless ``fixed_mmap`` is False); returns the JSON object of its last stdout line."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script)] + list(args)
    env = child_env() if fixed_mmap else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- comparing detections -------------------------------------------------------------------------------------------
#: The tolerances of the "identical detections" check (docs/benchmarks.md states the same figures).
BOX_TOL = 1e-2       # pixels, every box coordinate
SCORE_TOL = 1e-4     # absolute, every score
MASK_TOL = 1e-3      # absolute, every pasted mask probability


def compare_detections(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], box_tol: float = BOX_TOL,
                       score_tol: float = SCORE_TOL, mask_tol: float = MASK_TOL) -> Dict[str, Any]:
    """Whether ``a`` and ``b`` (``{boxes, labels, scores[, masks]}`` of one image) hold the same detections.

    ``identical`` is the check the benchmarks enforce (:func:`require_identical`): the same number of
    detections, detection ``i`` of ``a`` and of ``b`` have the same label, boxes within ``box_tol`` pixels
    (every coordinate), scores within ``score_tol`` and pasted mask probabilities within ``mask_tol`` (every
    pixel), i.e. the same detections **in the same order**. The rest is diagnostics: each detection of ``a`` is
    also paired with the closest unpaired same-label one of ``b`` within ``box_tol`` regardless of order
    (``paired``, ``in_same_order``, the scores of swapped pairs), the fraction of mask pixels whose binary mask
    (probability > 0.5) differs, and ``matched_iou90``: the fraction of ``a``'s detections with a same-label
    detection in ``b`` at IoU >= 0.9, the agreement figure for bf16.
    """
    from torchvision.ops import box_iou

    na, nb = int(a["boxes"].shape[0]), int(b["boxes"].shape[0])
    out: Dict[str, Any] = {"count_a": na, "count_b": nb, "tolerances": {"box_px": box_tol, "score": score_tol,
                                                                          "mask_prob": mask_tol}}
    pairs = []
    if na and nb:
        diff = (a["boxes"][:, None, :].float() - b["boxes"][None, :, :].float()).abs().amax(-1)
        same = a["labels"].long()[:, None] == b["labels"].long()[None, :]
        diff = torch.where(same, diff, torch.full_like(diff, float("inf")))
        free = torch.ones(nb, dtype=torch.bool)
        for i in range(na):
            d = torch.where(free, diff[i], torch.full_like(diff[i], float("inf")))
            j = int(d.argmin())
            if float(d[j]) <= box_tol:
                pairs.append((i, j))
                free[j] = False
    ia = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    ib = torch.tensor([j for _, j in pairs], dtype=torch.long)
    out["paired"] = len(pairs)
    out["in_same_order"] = bool(len(pairs) == na == nb and torch.equal(ia, ib))
    out["swapped_scores"] = [float(a["scores"][i]) for i, j in pairs if i != j][:10]
    out["max_box_diff"] = float((a["boxes"][ia] - b["boxes"][ib]).abs().max()) if pairs else None
    out["max_score_diff"] = float((a["scores"][ia] - b["scores"][ib]).abs().max()) if pairs else None
    has_masks = "masks" in a and "masks" in b
    if has_masks and pairs:
        ma, mb = a["masks"][ia], b["masks"][ib]
        out["max_mask_diff"] = float((ma.float() - mb.float()).abs().max())
        ma, mb = ma > 0.5, mb > 0.5
        out["mask_pixel_disagreement"] = float((ma ^ mb).sum()) / max(float((ma | mb).sum()), 1.0)
    else:
        out["max_mask_diff"] = out["mask_pixel_disagreement"] = None
    if na and nb:
        iou = box_iou(a["boxes"].float(), b["boxes"].float())
        same = a["labels"].long()[:, None] == b["labels"].long()[None, :]
        out["matched_iou90"] = float(((iou >= 0.9) & same).any(1).float().mean())
    else:
        out["matched_iou90"] = 1.0 if na == nb else 0.0
    out["identical"] = _identical_in_order(a, b, box_tol, score_tol, mask_tol, has_masks)
    return out


def _identical_in_order(a, b, box_tol: float, score_tol: float, mask_tol: float, has_masks: bool) -> bool:
    if a["boxes"].shape[0] != b["boxes"].shape[0]:
        return False
    if a["boxes"].shape[0] == 0:
        return True
    if not torch.equal(a["labels"].long(), b["labels"].long()):
        return False
    if float((a["boxes"].float() - b["boxes"].float()).abs().max()) > box_tol:
        return False
    if float((a["scores"].float() - b["scores"].float()).abs().max()) > score_tol:
        return False
    if has_masks:
        if a["masks"].shape != b["masks"].shape:
            return False
        if float((a["masks"].float() - b["masks"].float()).abs().max()) > mask_tol:
            return False
    return True


def require_identical(checks: Dict[str, Dict[str, Any]]) -> List[str]:
    """Names of the :func:`compare_detections` results in ``checks`` that are not identical, each printed with
    its differences; the benchmarks exit with status 1 when this is not empty."""
    failed = [name for name, c in checks.items() if not c["identical"]]
    for name in failed:
        c = checks[name]
        print(f"IDENTICAL-DETECTIONS CHECK FAILED for {name}: {c['count_b']} vs {c['count_a']} detections, same "
              f"order {c['in_same_order']}, max |d box| {c['max_box_diff']} (tol {c['tolerances']['box_px']}), "
              f"max |d score| {c['max_score_diff']} (tol {c['tolerances']['score']}), max |d mask prob| "
              f"{c['max_mask_diff']} (tol {c['tolerances']['mask_prob']})", file=sys.stderr)
    return failed


# --- torchvision at its best, and the fair ratios ---------------------------------------------------------------------
#: torchvision's eager settings timed by every benchmark: plain, channels-last, bf16 autocast + channels-last.
TV_PLAIN, TV_CL, TV_BF16 = "torchvision plain", "torchvision channels-last", "torchvision bf16+channels-last"
TV_SETTINGS = (TV_PLAIN, TV_CL, TV_BF16)


def torchvision_settings(tv: nn.Module, call: Callable[[nn.Module], Any]) -> Dict[str, Callable[[], Any]]:
    """One callable per torchvision setting (:data:`TV_SETTINGS`): ``call(model)`` on ``tv`` as it is, on a
    channels-last copy, and on that copy under CPU bf16 autocast (torchvision's own mixed precision)."""
    import copy

    tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(tv_cl)
    return {TV_PLAIN: lambda: call(tv), TV_CL: lambda: call(tv_cl), TV_BF16: bf16}


def fair_ratios(medians: Dict[str, float], ours_fp32: Optional[str], ours_bf16: Optional[str],
                ours_int8: Optional[str] = None) -> Dict[str, float]:
    """Median-time ratios (below 1: ours faster). Today's: ours against torchvision plain. Fair: ours fp32
    against torchvision's best fp32 setting (plain or channels-last), ours bf16 and ours int8 against torchvision
    bf16 + channels-last (torchvision's fastest setting; it has no int8 path)."""
    out: Dict[str, float] = {}
    tv_fp32 = min(((medians[k], k) for k in (TV_PLAIN, TV_CL) if k in medians), default=None)
    if ours_fp32 in medians:
        if TV_PLAIN in medians:
            out[f"{ours_fp32} / {TV_PLAIN}"] = medians[ours_fp32] / medians[TV_PLAIN]
        if tv_fp32 is not None:
            out[f"{ours_fp32} / best fp32 ({tv_fp32[1]})"] = medians[ours_fp32] / tv_fp32[0]
    if ours_bf16 in medians:
        if TV_PLAIN in medians:
            out[f"{ours_bf16} / {TV_PLAIN}"] = medians[ours_bf16] / medians[TV_PLAIN]
        if TV_BF16 in medians:
            out[f"{ours_bf16} / {TV_BF16}"] = medians[ours_bf16] / medians[TV_BF16]
    if ours_int8 in medians:
        if tv_fp32 is not None:
            out[f"{ours_int8} / best fp32 ({tv_fp32[1]})"] = medians[ours_int8] / tv_fp32[0]
        if TV_BF16 in medians:
            out[f"{ours_int8} / {TV_BF16}"] = medians[ours_int8] / medians[TV_BF16]
        if ours_fp32 in medians:
            out[f"{ours_int8} / {ours_fp32}"] = medians[ours_int8] / medians[ours_fp32]
    return out


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of timings in seconds, for the printed tables."""
    return f"{min(xs):.2f}-{max(xs):.2f} s"


def add_flush_denormal_arg(p) -> None:
    """``--flush-denormal 0|1`` (default 1) on a benchmark's argument parser: see :func:`apply_flush_denormal`."""
    p.add_argument("--flush-denormal", type=int, choices=(0, 1), default=1,
                   help="flush float denormals to zero in this process, for every model alike (default 1: what "
                        "tools/train_net.py and test_net.py do with FLUSH_DENORMAL; without it, repeated fp32 "
                        "training steps of both models slowed down 5x on an Intel Xeon)")


def apply_flush_denormal(flag: int) -> bool:
    """Set FTZ/DAZ for the whole process, before its thread pool starts (``maskrcnn.utils.flush_denormal``); every
    model timed in the process runs under the same setting, so no ratio depends on it. Returns whether it holds in
    every thread (always True for ``flag`` 0), after a warning on stderr where it does not."""
    from maskrcnn.utils.denormal import flush_denormal

    ok = flush_denormal(bool(flag)) or not flag
    if not ok:
        print("warning: --flush-denormal 1 did not reach every thread: denormals are kept", file=sys.stderr)
    return ok


def add_tune_malloc_arg(p) -> None:
    """``--tune-malloc 0|1`` (default 1) on a benchmark's argument parser: see :func:`apply_tune_malloc`."""
    p.add_argument("--tune-malloc", type=int, choices=(0, 1), default=1,
                   help="glibc malloc keeps freed memory in this process, for every model alike (default 1: what "
                        "tools/train_net.py and test_net.py do with TUNE_MALLOC, and what jemalloc or tcmalloc give "
                        "a torchvision user; 0: glibc's defaults, which unmap every block above 32 MiB when freed)")


def apply_tune_malloc(flag: int) -> bool:
    """``maskrcnn.utils.tune_malloc()`` for the whole process when ``flag`` is 1: every model timed in the
    process runs with the same allocator, so the setting is in no ratio, only in the absolute times. Not for the
    peak-memory children, whose measurement needs every tensor returned when freed (:func:`child_env`). Returns
    whether it applies, after a warning on stderr where glibc refused it."""
    if not flag:
        return False
    from maskrcnn.utils.malloc import tune_malloc

    ok = tune_malloc()
    if not ok:
        print("warning: --tune-malloc 1 was not applied (malloc is not glibc's, or glibc refused a value)",
              file=sys.stderr)
    return ok


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, creating its folder first (so that a result is not lost to a
    folder that does not exist yet)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def git_commit() -> str:
    """This checkout's commit (``-dirty`` when tracked files differ from it), recorded in every result JSON."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt_s(x: float) -> str:
    return f"{x:.3f} s"


def fmt_mib(x: float) -> str:
    return f"{x / 2 ** 20:.0f} MiB"
