"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, 2016), in plain PyTorch.

Each 4x4 block of outputs comes from a 6x6 tile of the input: the tile and the filter are taken to a 6x6 transform
domain (``V = B^T d B``, ``U = G g G^T``), multiplied there element by element and summed over the input channels,
and brought back (``Y = A^T M A``). Summing over the channels makes the products 36 matrix products ``(tiles, C_in)
@ (C_in, C_out)``: 36 multiply-adds per channel pair for 16 outputs, against 144 for a direct convolution, 4x
fewer. The input and output transforms are small matrix products (``kron(B^T, B^T)`` on 36 rows, ``kron(A^T,
A^T)`` back to 16) run on a chunk of tile rows (or of whole small images) at a time, into buffers reused by every
chunk, so that the intermediate tiles never take the memory of the whole map.

Float32 only: the transforms mix values with coefficients up to 8, so the result rounds more than a direct
convolution's: about 1e-5 of the output's scale at 256 channels (tests/ops/test_winograd.py), against 1e-6 to 1e-5
for oneDNN's direct kernels. That is fine for fp32 and too much for bf16's 8-bit mantissa. Inference only (no
autograd formula is defined for it here).

Where it pays (``python benchmarks/kernels.py --winograd``, docs/benchmarks.md): 256 channels or more, the FPN's
output convolutions, the RPN's convolution, the 3x3 convolutions of res4/res5 and the mask head's on 14x14 RoI
maps (there batched over the RoIs); it loses on 64-channel maps, where the transforms cost more than the products
save. :func:`winograd_applies` holds that rule.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_SIZE", "conv3x3_winograd", "winograd_applies", "winograd_weight"]

#: The smallest input channel count and map side that :func:`winograd_applies` accepts.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_SIZE = 14

_M = 4  # outputs per tile side
_A = _M + 2  # input tile side for a 3x3 filter
# float64 so that the filter transform (fractions of 6 and 24) is rounded once, into float32.
_BT = torch.tensor([[4, 0, -5, 0, 1, 0],
                    [0, -4, -4, 1, 1, 0],
                    [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0],
                    [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0],
                   [-1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6],
                   [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0],
                    [0, 1, -1, 2, -2, 0],
                    [0, 1, 1, 4, 4, 0],
                    [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
# The 2-D transforms B^T d B and A^T m A are run as two 1-D passes each (rows, then columns): a (6, 6) @ (6, X)
# product, then a batch of them. kron(B^T, B^T) as one (36, 36) product costs 3x the multiply-adds, and MKL runs
# that short, wide shape at a third of its rate (35-60 GFLOP/s against 170 on a 2-core AMD EPYC): the two passes
# took 0.4x its time on a chunk (benchmarks/kernels.py --winograd, docs/benchmarks.md).
_BT32 = _BT.float()
_AT32 = _AT.float()
#: Elements of one chunk's (36, tiles * C) tile matrix (18 MB in float32). Of 16K to 256K (x 36), 128K to 256K
#: were fastest at the FPN's shapes; at the mask head's (100 RoIs, chunks of whole RoIs) 32K to 2048K were within
#: the noise of each other (one-off sweeps on a 2-core AMD EPYC).
_CHUNK_ELEMENTS = 36 * 128 * 1024


def winograd_weight(weight: Tensor) -> Tensor:
    """``weight`` (C_out, C_in, 3, 3) -> its F(4x4, 3x3) transform ``G g G^T`` as (36, C_in, C_out) float32 (the
    right-hand sides of the 36 matrix products), computed in float64 and rounded once."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: expected a (C_out, C_in, 3, 3) weight, got {tuple(weight.shape)}")
    g = _G.to(weight.device)
    u = g @ weight.detach().double() @ g.t()  # (C_out, C_in, 6, 6)
    return u.reshape(weight.shape[0], weight.shape[1], _A * _A).permute(2, 1, 0).contiguous().float()


def winograd_applies(x: Tensor, weight_shape, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups: int = 1) -> bool:
    """Whether :func:`conv3x3_winograd` runs this convolution and is expected to be faster than oneDNN's: a CPU
    float32 input (N, C_in, H, W) with C_in >= :data:`WINOGRAD_MIN_CHANNELS` and H, W >= :data:`WINOGRAD_MIN_SIZE`,
    a (C_out, C_in, 3, 3) weight, stride 1, padding 1, dilation 1, one group, and no gradient wanted."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and tuple(weight_shape[1:]) == (x.shape[1], 3, 3) and groups == 1
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
            and x.shape[1] >= WINOGRAD_MIN_CHANNELS and min(x.shape[2], x.shape[3]) >= WINOGRAD_MIN_SIZE
            and not (torch.is_grad_enabled() and x.requires_grad))


def _pad_channels_last(x: Tensor, hp: int, wp: int) -> Tensor:
    """(N, C, H, W) -> a dense (N, hp, wp, C) copy with x at [1:H+1, 1:W+1] and zeros around it (the convolution's
    padding of 1, and enough on the bottom/right for whole tiles). Only the border is zeroed, and a channels-last x
    is copied without a transposition (F.pad would fill the whole map and return it channels-first)."""
    n, c, h, w = x.shape
    xp = x.new_empty(n, hp, wp, c)
    xp[:, 0].zero_()
    xp[:, h + 1:].zero_()
    xp[:, 1:h + 1, 0].zero_()
    xp[:, 1:h + 1, w + 1:].zero_()
    xp[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    return xp


@torch.no_grad()
def conv3x3_winograd(x: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` (then ReLU with ``relu``) by F(4x4, 3x3).

    Args:
        x: (N, C_in, H, W) float32, any memory format (channels-last reads without a copy).
        weight_t: (36, C_in, C_out) float32, :func:`winograd_weight` of the (C_out, C_in, 3, 3) weight.
        bias: optional (C_out,) float32.
    Returns (N, C_out, H, W) float32, channels-last. No autograd.
    """
    if x.dim() != 4 or x.dtype != torch.float32 or weight_t.dtype != torch.float32:
        raise ValueError(f"conv3x3_winograd: expected float32 (N, C, H, W) input and weight, got {x.dtype} "
                         f"{tuple(x.shape)} and {weight_t.dtype}")
    n, c, h, w = x.shape
    if weight_t.dim() != 3 or weight_t.shape[0] != _A * _A or weight_t.shape[1] != c:
        raise ValueError(f"conv3x3_winograd: weight_t must be ({_A * _A}, {c}, C_out) (winograd_weight of a "
                         f"(C_out, {c}, 3, 3) weight), got {tuple(weight_t.shape)}")
    cout = weight_t.shape[2]
    th, tw = -(-h // _M), -(-w // _M)
    xp = _pad_channels_last(x, _M * th + 2, _M * tw + 2)
    sn, sh, sw, sc = xp.stride()
    bt, at = _BT32.to(x.device), _AT32.to(x.device)
    bt_b, at_b = bt.expand(_A, _A, _A), at.expand(_M, _M, _A)
    out = torch.empty(n, _M * th, _M * tw, cout, dtype=x.dtype, device=x.device)
    # A chunk is a few tile rows of one image or, for small maps (RoI features), several whole images.
    per_image = _A * _A * th * tw * max(c, cout)
    images = max(1, min(n, _CHUNK_ELEMENTS // per_image))
    rows = th if images > 1 else max(1, min(th, _CHUNK_ELEMENTS // (_A * _A * tw * max(c, cout))))
    aa = _A * _A
    # d_buf holds the gathered tiles d, then (after the row pass into h_buf) their transform V = B^T d B.
    # Flat buffers: a partial last chunk takes a dense prefix of each.
    most = images * rows * tw
    d_buf = x.new_empty(aa * most * c)
    h_buf = x.new_empty(aa * most * c)
    m_buf = x.new_empty(aa * most * cout)
    g_buf = x.new_empty(_M * _A * most * cout)
    y_buf = x.new_empty(_M * _M * most * cout)
    for b0 in range(0, n, images):
        nb = min(images, n - b0)
        for r0 in range(0, th, rows):
            r = min(rows, th - r0)
            t = nb * r * tw
            # (6, 6, nb, r, tw, C) view of the overlapping tiles (stride 4, tile 6), gathered into 36 rows.
            tiles = xp.as_strided((_A, _A, nb, r, tw, c), (sh, sw, sn, _M * sh, _M * sw, sc),
                                  xp.storage_offset() + b0 * sn + _M * r0 * sh)
            d = d_buf[:aa * t * c]
            d.view(_A, _A, nb, r, tw, c).copy_(tiles)
            # V = B^T d B: over the tile's rows (one product), then over its columns (one per row).
            hv = h_buf[:aa * t * c]
            torch.mm(bt, d.view(_A, _A * t * c), out=hv.view(_A, _A * t * c))
            v = d
            torch.bmm(bt_b, hv.view(_A, _A, t * c), out=v.view(_A, _A, t * c))
            m = m_buf[:aa * t * cout].view(aa, t, cout)
            torch.bmm(v.view(aa, t, c), weight_t, out=m)
            # Y = A^T M A, the same way.
            g = g_buf[:_M * _A * t * cout]
            torch.mm(at, m.view(_A, _A * t * cout), out=g.view(_M, _A * t * cout))
            y = y_buf[:_M * _M * t * cout]
            torch.bmm(at_b, g.view(_M, _A, t * cout), out=y.view(_M, _M, t * cout))
            out[b0:b0 + nb, _M * r0:_M * (r0 + r)].view(nb, r, _M, tw, _M, cout).copy_(
                y.view(_M, _M, nb, r, tw, cout).permute(2, 3, 0, 4, 1, 5))
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if relu:
        out.relu_()
    if out.shape[1] != h or out.shape[2] != w:
        # Dense again: the next convolutions read channels-last contiguous maps.
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)
