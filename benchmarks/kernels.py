"""The kernel choices inside our speed paths, each timed against what it replaced, on the shapes the model runs.

    python benchmarks/kernels.py [--rounds 5] [--fp32] [--threads N] [--json OUT]

Rows (R-50-FPN shapes at 800x1066):

- ``pointwise backward bf16 CinxCout@HxW``: the backward (input and weight gradients) of a 1x1 stride-1 convolution
  of channels-last bf16 tensors at batch 2, as oneDNN's ``aten::convolution_backward`` (before) and as the two
  matrix products of ``maskrcnn.engine.frozen_bn_training._pointwise_conv_backward`` (now, in bf16 training with
  ``TRAIN.FUSE_FROZEN_BN``). The shapes are the folded 1x1 convolutions of res3-res5 (conv1, conv3 and the
  projection shortcuts) that a training step differentiates. ``--fp32``: the same in fp32, where training keeps
  oneDNN's.
- ``identity gradient sum CxHxW``: conv1's input gradient in an identity block plus the residual's gradient,
  as ``mm`` then ``add_`` (autograd's accumulation, before) and as one ``addmm`` (now, ``conv_relu(tap=True)``).
- ``mask logits 100 x K classes``: each detection's mask logits of its own class from the mask head's
  ``(100, 256, 28, 28)`` output, as ``Mask_Outs`` on every class then the label's channel (before) and as
  ``MaskRCNNOutputs.label_logits`` (now, ``ROIHeads.mask_probs`` at inference), fp32, with the sigmoid.
- ``weight gradient by taps fp32 3x3/2 CxC@NxHxW``: the weight gradient of a stride-2 3x3 convolution of
  channels-last fp32 maps (res3-res5's first 3x3 with torchvision's stride placement, batch 2), as oneDNN's
  ``aten::convolution_backward`` (before) and as one matrix product per kernel tap
  (``maskrcnn.engine.frozen_bn_training._tap_weight_grad``, now, in fp32 training with ``TRAIN.FUSE_FROZEN_BN``).
- ``winograd 3x3 fp32 CinxCout@NxHxW`` (``--winograd``): a 3x3 stride-1 float32 convolution + ReLU of a
  channels-last map, as oneDNN's fused kernel (``FusedConv2d``, before) and as ``maskrcnn.ops.conv3x3_winograd``
  (now, ``TEST.WINOGRAD``) with the tile ``winograd_tile`` picks for the map, named in the row. The rule
  (``winograd_applies``) takes the FPN's output convolutions and the RPN's on P2-P5 (256@200x272 .. 256@25x34;
  256@50x68 is also res4's 3x3), res5's 3x3 (512@25x34) and the mask head's (100 RoIs of 14x14); the rows marked
  "(not taken)" are those it leaves to oneDNN: res2/res3's 3x3.
- ``winograd F(mxm) against F(4x4) ...``: where that tile is 5 or 6, the same convolution by F(4x4, 3x3) (before)
  and by the tile taken (now).
- ``winograd train 3x3 fp32 CinxCout@NxHxW F(mxm)`` (``--winograd``): forward and backward (input, weight and bias
  gradients) of the same convolution as ``F.conv2d`` under autograd (oneDNN, before) and as
  ``maskrcnn.ops.conv3x3_winograd_autograd`` (now, ``TRAIN.WINOGRAD``), on a training step's shapes; "(not
  taken)": where ``winograd_applies(..., grad=True)`` leaves it to oneDNN.
- ``winograd train backbone 3x3+ReLU fp32 CinxCout@NxHxW F(mxm)`` (``--winograd``): a ResNet block's middle
  convolution with its frozen BN folded and its ReLU, forward and backward (input and weight gradients), as
  ``FrozenBNConv2d.conv_relu`` (oneDNN's fused kernel, before) and as ``WinogradFrozenBNConv2d.conv_relu`` (now,
  ``TRAIN.WINOGRAD``), on res3's (128@2x100x136), res4's (256@2x50x68) and res5's (512@2x25x34) shapes at 800 px
  and on smaller ones the rule leaves to oneDNN.

  The same input is convolved call after call, so a map that fits the caches is read from them, which a model's
  maps are not: the Winograd rows flatter the transforms' memory traffic. ``inference.py --ablation`` measures the
  whole model.

glibc malloc is tuned for the whole process (``--tune-malloc 1``, the default, as training and ``tools/test_net.py``
run): freed buffers are reused instead of mapped and faulted in again at every call, which otherwise weighs on the
Winograd rows' large temporaries. Each row alternates the two after a warm-up, ``--rounds`` rounds of ``--repeats`` calls each; it prints the median
of the per-round times and the per-round ratios now / before (< 1: now is faster) with their min-max.
A diagnostic of our own choices on this machine, not a ratio against another library.
"""

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import common  # noqa: E402
from maskrcnn.engine.frozen_bn_training import _pointwise_conv_backward  # noqa: E402
from maskrcnn.engine.onednn_fusion import FusedConv2d  # noqa: E402
from maskrcnn.ops.winograd import (conv3x3_winograd, conv3x3_winograd_autograd, winograd_applies,  # noqa: E402
                                   winograd_tile, winograd_weight)
from maskrcnn.modeling.roi_heads.mask_outputs import MaskRCNNOutputs  # noqa: E402

CL = torch.channels_last
# (Cin, Cout, H, W) of the trainable folded 1x1 convolutions of R-50 at 800x1066 (torchvision-style strides).
POINTWISE = [(256, 128, 100, 136), (128, 512, 100, 136), (512, 128, 100, 136), (256, 512, 100, 136),
             (512, 256, 50, 68), (256, 1024, 50, 68), (1024, 256, 50, 68), (512, 1024, 50, 68),
             (1024, 512, 25, 34), (512, 2048, 25, 34), (2048, 512, 25, 34), (1024, 2048, 25, 34)]
IDENTITY = [(128, 512, 100, 136), (256, 1024, 50, 68), (512, 2048, 25, 34)]  # (conv1 Cout, block C, H, W)
# (N, C, H, W) of 3x3 stride-1 convolutions (C in = C out) of R-50-FPN at 800x1066 (padded to 800x1088).
WINOGRAD = [(1, 256, 200, 272), (1, 256, 100, 136), (1, 256, 50, 68), (1, 256, 25, 34), (1, 512, 25, 34),
            (1, 64, 200, 272), (1, 128, 100, 136), (100, 256, 14, 14)]
# A training step's (batch 2 at 800x1066): the FPN's output and RPN convolutions on P2-P6, the mask head's on the
# sampled positives' RoIs (about 64 at batch 2).
WINOGRAD_TRAIN = [(2, 256, 200, 272), (2, 256, 100, 136), (2, 256, 50, 68), (2, 256, 25, 34), (2, 256, 13, 17),
                  (64, 256, 14, 14)]
#: (N, C, H, W) inputs of the stride-2 3x3 convolutions of res3-res5 in a training step at 800x1066 (batch 2).
TAPS = [(2, 128, 200, 272), (2, 256, 100, 136), (2, 512, 50, 68)]
#: (N, C, H, W) of the backbone's 3x3 convolutions in a training step: res3, res4 and res5 at 800x1066 (batch 2),
#: res3 at 480x640, res5 at batch 1 and at 480x640.
WINOGRAD_TRAIN_BACKBONE = [(2, 128, 100, 136), (2, 256, 50, 68), (2, 512, 25, 34), (2, 128, 60, 80), (1, 512, 25, 34),
                           (2, 512, 15, 20)]


def pointwise_rows(gen: torch.Generator, dtype: torch.dtype) -> Dict[str, List[Callable]]:
    rows = {}
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    for cin, cout, h, w in POINTWISE:
        x = torch.randn(2, cin, h, w, generator=gen).to(dtype).contiguous(memory_format=CL)
        g = torch.randn(2, cout, h, w, generator=gen).to(dtype).contiguous(memory_format=CL)
        wt = (torch.randn(cout, cin, 1, 1, generator=gen) / cin ** 0.5).to(dtype)

        def before(x=x, g=g, wt=wt, cout=cout):
            return torch.ops.aten.convolution_backward(g, x, wt, [cout], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                       [True, True, False])

        def now(x=x, g=g, wt=wt):
            return _pointwise_conv_backward(g, x, wt, True, True, False)

        rows[f"pointwise backward {name} {cin}x{cout}@{h}x{w}"] = [before, now]
    return rows


def identity_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    rows = {}
    for k, c, h, w in IDENTITY:
        g1 = torch.randn(2 * h * w, k, generator=gen).to(torch.bfloat16)
        w1 = torch.randn(k, c, generator=gen).to(torch.bfloat16)
        tap = torch.randn(2 * h * w, c, generator=gen).to(torch.bfloat16)
        rows[f"identity gradient sum {c}x{h}x{w}"] = [lambda g1=g1, w1=w1, tap=tap: torch.mm(g1, w1).add_(tap),
                                                       lambda g1=g1, w1=w1, tap=tap: torch.addmm(tap, g1, w1)]
    return rows


def mask_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    rows = {}
    x = torch.randn(100, 256, 28, 28, generator=gen).contiguous(memory_format=CL)
    for classes in (81, 91):
        outs = MaskRCNNOutputs(256, classes).eval().to(memory_format=CL)
        labels = torch.randint(1, classes, (100,), generator=gen)
        idx = torch.arange(100)

        def before(outs=outs, labels=labels):
            with torch.no_grad():
                return outs(x)[idx, labels][:, None].sigmoid()

        def now(outs=outs, labels=labels):
            with torch.no_grad():
                return outs.label_logits(x, labels).sigmoid()

        rows[f"mask logits 100 x {classes} classes"] = [before, now]
    return rows


def winograd_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    rows, against_f4 = {}, {}
    for n, c, h, w in WINOGRAD:
        x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
        conv = torch.nn.Conv2d(c, c, 3, padding=1)
        fused = FusedConv2d(conv, "relu").to(memory_format=CL)
        tile = winograd_tile(h, w)
        wt, bias = winograd_weight(fused.weight, tile), fused.bias
        taken = "" if winograd_applies(x, fused.weight.shape) else " (not taken)"

        def before(x=x, fused=fused):
            with torch.no_grad():
                return fused(x)

        def now(x=x, wt=wt, bias=bias):
            return conv3x3_winograd(x, wt, bias, relu=True)

        shape = f"{c}x{c}@{n}x{h}x{w}"
        rows[f"winograd 3x3 fp32 {shape} F({tile}x{tile}){taken}"] = [before, now]
        if tile != 4 and not taken:
            wt4 = winograd_weight(fused.weight, 4)
            against_f4[f"winograd F({tile}x{tile}) against F(4x4) {shape}"] = [
                lambda x=x, wt4=wt4, bias=bias: conv3x3_winograd(x, wt4, bias, relu=True), now]
    rows.update(against_f4)
    return rows


def winograd_train_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    rows = {}
    for n, c, h, w in WINOGRAD_TRAIN:
        x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL).requires_grad_()
        weight = (torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5)).contiguous(memory_format=CL)
        weight.requires_grad_()
        bias = torch.zeros(c, requires_grad=True)
        grad_out = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
        taken = "" if winograd_applies(x, weight.shape, grad=True) else " (not taken)"

        def step(conv, x=x, weight=weight, bias=bias, grad_out=grad_out):
            def run():
                x.grad = weight.grad = bias.grad = None
                conv(x, weight, bias).backward(grad_out)
                return x.grad, weight.grad, bias.grad
            return run

        rows[f"winograd train 3x3 fp32 {c}x{c}@{n}x{h}x{w} F({winograd_tile(h, w)}x{winograd_tile(h, w)}){taken}"] = [
            step(lambda x, w, b: F.conv2d(x, w, b, padding=1)), step(conv3x3_winograd_autograd)]
    return rows


def tap_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    from maskrcnn.engine.frozen_bn_training import _tap_weight_grad

    rows = {}
    for n, c, h, w in TAPS:
        x = torch.randn(n, c, h, w, generator=gen).relu().contiguous(memory_format=CL)
        weight = (torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5)).contiguous(memory_format=CL)
        grad = torch.randn(n, c, (h + 1) // 2, (w + 1) // 2, generator=gen).contiguous(memory_format=CL)

        def before(x=x, weight=weight, grad=grad):
            return torch.ops.aten.convolution_backward(grad, x, weight, None, [2, 2], [1, 1], [1, 1], False, [0, 0],
                                                       1, [False, True, False])[1]

        def now(x=x, grad=grad):
            return _tap_weight_grad(grad, x, (3, 3), (2, 2), (1, 1))
        rows[f"weight gradient by taps fp32 3x3/2 {c}x{c}@{n}x{h}x{w}"] = [before, now]
    return rows


def winograd_backbone_rows(gen: torch.Generator) -> Dict[str, List[Callable]]:
    from maskrcnn.engine.frozen_bn_training import FoldedFrozenBatchNorm2d, FrozenBNConv2d
    from maskrcnn.engine.winograd_training import enable_winograd_training
    from maskrcnn.modeling.backbone.frozen_bn import FrozenBatchNorm2d

    rows = {}
    for n, c, h, w in WINOGRAD_TRAIN_BACKBONE:
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        bn = FrozenBatchNorm2d(c)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5))
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        plain = FrozenBNConv2d(conv, FoldedFrozenBatchNorm2d.from_frozen(bn)).to(memory_format=CL)
        fast = FrozenBNConv2d(conv, FoldedFrozenBatchNorm2d.from_frozen(bn)).to(memory_format=CL)
        enable_winograd_training(torch.nn.Sequential(fast))  # same parameter objects, Winograd class
        x = torch.randn(n, c, h, w, generator=gen).relu().contiguous(memory_format=CL).requires_grad_()
        grad_out = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
        taken = "" if winograd_applies(x, conv.weight.shape, grad=True) else " (not taken)"

        def step(m, x=x, grad_out=grad_out):
            def run():
                x.grad = m.weight.grad = None
                m.conv_relu(x).backward(grad_out)
                return x.grad, m.weight.grad
            return run
        tile = winograd_tile(h, w)
        rows[f"winograd train backbone 3x3+ReLU fp32 {c}x{c}@{n}x{h}x{w} F({tile}x{tile}){taken}"] = [
            step(plain), step(fast)]
    return rows


def time_row(fns: List[Callable], rounds: int, repeats: int) -> List[List[float]]:
    """Per callable, its ms per call in each of ``rounds`` alternated rounds of ``repeats`` calls
    (:func:`common.alternate`)."""
    def batch(fn: Callable) -> Callable:
        return lambda: [fn() for _ in range(repeats)]

    times = common.alternate({str(i): batch(f) for i, f in enumerate(fns)}, rounds)
    return [[t / repeats * 1e3 for t in times[str(i)]] for i in range(len(fns))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--fp32", action="store_true",
                        help="also the pointwise backward in fp32 (where training keeps oneDNN's)")
    parser.add_argument("--winograd", action="store_true", help="also the Winograd 3x3 rows")
    parser.add_argument("--only", default="", help="only the rows whose name contains this text")
    common.add_tune_malloc_arg(parser)
    args = parser.parse_args(argv)
    common.apply_tune_malloc(args.tune_malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = {**pointwise_rows(gen, torch.bfloat16), **identity_rows(gen), **mask_rows(gen), **tap_rows(gen)}
    if args.fp32:
        rows.update(pointwise_rows(gen, torch.float32))
    if args.winograd:
        rows.update(winograd_rows(gen))
        rows.update(winograd_train_rows(gen))
        rows.update(winograd_backbone_rows(gen))
    rows = {name: fns for name, fns in rows.items() if args.only in name}
    commit = common.git_commit()
    print(f"# kernels, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x "
          f"{args.repeats} calls, malloc {'tuned' if args.tune_malloc else 'default'}, commit {commit}")
    out = {}
    for name, fns in rows.items():
        print(f"## {name} (round lines: 0 = before, 1 = now, seconds for {args.repeats} calls)", flush=True)
        before, now = time_row(fns, args.rounds, args.repeats)
        out[name] = {"before_ms": before, "now_ms": now}
    print("\n| row | before ms | now ms | now / before (median) | per-round min-max |")
    print("|---|---|---|---|---|")
    totals = {"bf16": [0.0, 0.0], "fp32": [0.0, 0.0]}
    for name, res in out.items():
        before, now = res["before_ms"], res["now_ms"]
        ratios = [n / b for b, n in zip(before, now)]
        b_med, n_med = statistics.median(before), statistics.median(now)
        if name.startswith("pointwise"):
            totals[name.split()[2]][0] += b_med
            totals[name.split()[2]][1] += n_med
        print(f"| {name} | {b_med:.2f} | {n_med:.2f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.3f}-{max(ratios):.3f} |")
    for dtype, (b_sum, n_sum) in totals.items():
        if b_sum:
            print(f"| pointwise backward {dtype}, sum of the {len(POINTWISE)} shapes | {b_sum:.2f} | {n_sum:.2f} | "
                  f"{n_sum / b_sum:.3f} | - |")
    if args.json:
        common.write_json(args.json, {"benchmark": "kernels", "commit": commit,
                                      "machine": common.machine_info(), "threads": torch.get_num_threads(),
                                      "rounds": args.rounds, "repeats": args.repeats,
                                      "tune_malloc": bool(args.tune_malloc), "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
