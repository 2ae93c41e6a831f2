"""3x3 convolution by Winograd's minimal filtering F(m x m, 3x3), m = 4, 5 or 6 (Lavin & Gray, 2016), in plain
PyTorch.

Each m x m block of outputs comes from an a x a tile of the input (a = m + 2): the tile and the filter are taken to
an a x a transform domain (``V = B^T d B``, ``U = G g G^T``), multiplied there element by element and summed over
the input channels, and brought back (``Y = A^T M A``). Summing over the channels makes the products a * a matrix
products ``(tiles, C_in) @ (C_in, C_out)``: for F(4x4, 3x3) 36 multiply-adds per channel pair for 16 outputs,
against 144 for a direct convolution (4x fewer); F(6x6, 3x3) 64 for 36 (5x fewer). The matrices come from their
interpolation points by Toom-Cook (:func:`_transforms`).

The input and output transforms run as two 1-D passes each, over the tile's rows (one ``(a, a) @ (a, X)``
product) then its columns (a batch of them), on a chunk of tile rows (or of whole small images) at a time, into
buffers reused by every chunk, so that the intermediate tiles never take the memory of the whole map. One
``kron(B^T, B^T)`` product instead costs 3x the multiply-adds, and MKL runs that short, wide shape at a third of
its rate.

:func:`winograd_tile` picks m per map: the fewest transform-domain elements (tile elements x tiles, what the
products and the transforms' memory traffic scale with), so 5 on the mask head's 14x14 RoI maps (9 tiles of 49
against 16 of 36) and 6 on the FPN's large maps.

Float32 only: the transforms mix values with coefficients up to 8 (up to 32 for m = 6), so the result rounds more
than a direct convolution's: about 1e-5 of the output's scale at 256 channels for every m (F(6x6) about 1.5x
F(4x4)'s; tests/ops/test_winograd.py), against 1e-6 to 1e-5 for oneDNN's direct kernels. That is fine for fp32 and
too much for bf16's 8-bit mantissa. Larger tiles round much more (F(7x7, 3x3): 3e-4), so they are not offered.
:func:`conv3x3_winograd` has no autograd; :func:`conv3x3_winograd_autograd` (training, ``TRAIN.WINOGRAD``) runs the
forward, the input gradient and the weight gradient (:func:`conv3x3_winograd_weight_grad`) in the transform domain.

Where it pays (``python benchmarks/kernels.py --winograd``, docs/benchmarks.md): 256 channels or more, the FPN's
output convolutions, the RPN's convolution, the 3x3 convolutions of res4/res5 and the mask head's on 14x14 RoI
maps (there batched over the RoIs); it loses on 64-channel maps, where the transforms cost more than the products
save. :func:`winograd_applies` holds that rule.
"""
from __future__ import annotations

import functools
from fractions import Fraction
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS_PER_CHANNEL", "WINOGRAD_MIN_SIZE",
           "WINOGRAD_NARROW_CHANNELS", "WINOGRAD_NARROW_MIN_PIXELS_PER_CHANNEL", "WINOGRAD_TILES",
           "conv3x3_winograd", "conv3x3_winograd_autograd", "conv3x3_winograd_weight_grad", "winograd_applies",
           "winograd_tile", "winograd_weight"]

#: The smallest input channel count and map side that :func:`winograd_applies` accepts.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_SIZE = 14
#: Training (``winograd_applies(..., grad=True)``): the fewest pixels (N * H * W) per channel. ``python
#: benchmarks/kernels.py --winograd --only train`` on a 2-core AMD EPYC (glibc malloc tuned, as training runs;
#: benchmarks/results/kernels_winograd_train_2026-12-06_epyc_stop37.txt), forward + backward against oneDNN's: at
#: 512 channels with the ReLU 0.72 at 3.3 pixels per channel (2x25x34), 0.98 at 1.7 (1x25x34) and 0.99 at 1.2
#: (2x15x20); at 256 channels 0.85 at 6.6 (2x25x34) and 1.80 at 1.7 (2x13x17).
WINOGRAD_MIN_PIXELS_PER_CHANNEL = 3
#: Training also takes narrower convolutions (from :data:`WINOGRAD_NARROW_CHANNELS` to 255 channels, in or out:
#: ResNet's res3), where the transforms weigh more against the products, on larger batches of pixels (at least
#: :data:`WINOGRAD_NARROW_MIN_PIXELS_PER_CHANNEL` x max(C_in, C_out)). Same run, 128 channels with the ReLU: 0.67 at
#: 2x100x136 (212 pixels per channel), 1.02 at 2x60x80 (75). At 64 channels the transforms cost more than the
#: products save (the inference rows of ``--winograd``: 1.27 at 1x200x272, stop 36).
WINOGRAD_NARROW_CHANNELS = 128
WINOGRAD_NARROW_MIN_PIXELS_PER_CHANNEL = 128

#: Output tile sides :func:`conv3x3_winograd` runs: F(4x4, 3x3) (6x6 input tiles), F(5x5, 3x3) (7x7) and
#: F(6x6, 3x3) (8x8).
WINOGRAD_TILES = (4, 5, 6)
# Toom-Cook interpolation points (infinity is the last one, implied): the usual small ones, whose transforms
# round least (Lavin & Gray; Barabasz et al., 2020). F(5x5, 3x3) rounds about as F(4x4, 3x3), F(6x6, 3x3) about
# 1.5x more; of 1/2 and -1/2 for F(5x5), 1/2 rounded least (one-off measurement at 256 channels).
# F(2x2) and F(3x3) are not offered (WINOGRAD_TILES: they save less than F(4x4) in fp32); their matrices serve
# benchmarks/winograd_precision.py, which measures what each tile rounds with bf16 products.
_POINTS = {2: (0, 1, -1), 3: (0, 1, -1, 2), 4: (0, 1, -1, 2, -2), 5: (0, 1, -1, 2, -2, Fraction(1, 2)),
           6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}
#: Elements of one chunk's (tile elements, tiles * C) matrix: 18 MB in float32. Of 16K to 256K (x 36), 64K to 256K
#: were within a few percent of each other at the FPN's shapes, and at the mask head's (100 RoIs, chunks of whole
#: RoIs) the larger the better up to 256K (one-off sweeps on a 2-core AMD EPYC).
_CHUNK_ELEMENTS = 36 * 128 * 1024


def _poly_times_root(poly: List[Fraction], root: Fraction) -> List[Fraction]:
    """Coefficients (lowest power first) of ``poly(x) * (x - root)``."""
    return [a - root * b for a, b in zip([Fraction(0)] + poly, poly + [Fraction(0)])]


@functools.lru_cache(maxsize=None)
def _transforms(m: int) -> Tuple[Tensor, Tensor, Tensor]:
    """F(m x m, 3x3)'s ``B^T`` (a, a), ``G`` (a, 3) and ``A^T`` (m, a), a = m + 2, float64, from its points by
    Toom-Cook, in exact fractions: ``A^T`` evaluates the output polynomial at the points (infinity: its top
    coefficient), ``G`` the filter's, divided by the Lagrange denominators, and ``B^T``'s rows are the numerators'
    coefficients (infinity: the product of all ``x - p``)."""
    points = [Fraction(p) for p in _POINTS[m]]
    at = [[p ** i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, bt = [], []
    for j, p in enumerate(points):
        numerator, denominator = [Fraction(1)], Fraction(1)
        for q in points[:j] + points[j + 1:]:
            numerator, denominator = _poly_times_root(numerator, q), denominator * (p - q)
        g.append([p ** k / denominator for k in range(3)])
        bt.append(numerator + [Fraction(0)])
    g.append([Fraction(0), Fraction(0), Fraction(1)])
    full = [Fraction(1)]
    for q in points:
        full = _poly_times_root(full, q)
    bt.append(full)

    def as_tensor(rows):
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    return as_tensor(bt), as_tensor(g), as_tensor(at)


def winograd_tile(h: int, w: int) -> int:
    """The output tile side (:data:`WINOGRAD_TILES`) for an (h, w) map: the one that covers it with the fewest
    transform-domain elements (tile elements x tiles, what the products and the transforms' memory traffic scale
    with), ties going to the smaller, more exact tile; 6 only where both sides are 32 or more, as its transformed
    weight (64 x C_in x C_out) weighs on small maps. The mask head's 14x14 RoI maps take 5 (9 tiles of 49 elements
    against 16 of 36), the FPN's P4 and larger 6. On a 2-core AMD EPYC at 256 channels that choice took 0.83 of
    F(4x4)'s time at 100x14x14, 0.89 at 25x34 and 0.78 at 100x136 (``benchmarks/kernels.py --winograd``)."""
    def cost(m: int) -> Tuple[int, int]:
        return (m + 2) ** 2 * -(-h // m) * -(-w // m), m
    return min((m for m in WINOGRAD_TILES if m < 6 or min(h, w) >= 32), key=cost)


def winograd_weight(weight: Tensor, tile: int = 4, dtype: torch.dtype = torch.float64) -> Tensor:
    """``weight`` (C_out, C_in, 3, 3) -> its F(tile x tile, 3x3) transform ``G g G^T`` as (a * a, C_in, C_out)
    float32, a = tile + 2 (the right-hand sides of the a * a matrix products), computed in ``dtype`` and rounded
    once: float64 where it is computed once and cached (inference), float32 where it is computed at every step
    (training, :func:`conv3x3_winograd_autograd`; about 1e-7 of the weights' scale)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: expected a (C_out, C_in, 3, 3) weight, got {tuple(weight.shape)}")
    if tile not in WINOGRAD_TILES:
        raise ValueError(f"winograd_weight: tile must be one of {WINOGRAD_TILES}, got {tile!r}")
    return _transform_filters(weight.detach().permute(2, 3, 1, 0), tile, dtype)


def _transform_filters(w: Tensor, tile: int, dtype: torch.dtype) -> Tensor:
    """``w`` viewed as (3 [k], 3 [l], C_in, C_out) -> ``G w G^T`` as (a * a, C_in, C_out) float32: over k (one
    product), then over l (a batch of a), so that every step is a plain product on the whole filter bank and the
    result comes out in the layout of the products without a transposition."""
    _, g, _ = _transforms(tile)
    g = g.to(w.device, dtype)
    a = tile + 2
    cin, cout = w.shape[2], w.shape[3]
    w = w.to(dtype).contiguous().view(3, 3 * cin * cout)
    gw = (g @ w).view(a, 3, cin * cout)  # [p, l, (i, o)]
    u = torch.bmm(g.expand(a, a, 3), gw)  # [p, q, (i, o)]
    return u.view(a * a, cin, cout).float()


def winograd_applies(x: Tensor, weight_shape, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups: int = 1,
                     grad: bool = False) -> bool:
    """Whether :func:`conv3x3_winograd` runs this convolution and is expected to be faster than oneDNN's: a CPU
    float32 input (N, C_in, H, W) with C_in >= :data:`WINOGRAD_MIN_CHANNELS` and H, W >= :data:`WINOGRAD_MIN_SIZE`,
    a (C_out, C_in, 3, 3) weight, stride 1, padding 1, dilation 1, one group, and no gradient wanted.

    With ``grad`` (:func:`conv3x3_winograd_autograd`, training), a gradient may be wanted, and the batch must also
    hold at least :data:`WINOGRAD_MIN_PIXELS_PER_CHANNEL` x max(C_in, C_out) pixels (N * H * W): each step
    transforms the weight twice and the weight gradient once, which small maps do not pay back. C_in and C_out
    from :data:`WINOGRAD_NARROW_CHANNELS` (128) also qualify there, with
    :data:`WINOGRAD_NARROW_MIN_PIXELS_PER_CHANNEL` x max(C_in, C_out) pixels."""
    ok = (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
          and tuple(weight_shape[1:]) == (x.shape[1], 3, 3) and groups == 1
          and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
          and min(x.shape[2], x.shape[3]) >= WINOGRAD_MIN_SIZE)
    if not ok:
        return False
    if not grad:
        return x.shape[1] >= WINOGRAD_MIN_CHANNELS and not (torch.is_grad_enabled() and x.requires_grad)
    narrowest, widest = min(weight_shape[:2]), max(weight_shape[:2])
    per_channel = (WINOGRAD_MIN_PIXELS_PER_CHANNEL if narrowest >= WINOGRAD_MIN_CHANNELS else
                   WINOGRAD_NARROW_MIN_PIXELS_PER_CHANNEL if narrowest >= WINOGRAD_NARROW_CHANNELS else None)
    return per_channel is not None and x.shape[0] * x.shape[2] * x.shape[3] >= per_channel * widest


def _window(dst: Tensor, src: Tensor, b0: int, row0: int, col0: int) -> Tensor:
    """Fill ``dst`` (nb, R, W', C) with the rows ``row0 .. row0 + R`` and columns ``col0 .. col0 + W'`` of the images
    ``b0 .. b0 + nb`` of ``src`` (N, H, W, C), zeros where that window leaves the map (the convolution's padding, and
    the rest of the last tiles). A channels-last map's (N, H, W, C) view is copied without a transposition."""
    nb, rr, ww = dst.shape[:3]
    h, w = src.shape[1:3]
    r_lo, r_hi = max(row0, 0), min(row0 + rr, h)
    c_lo, c_hi = max(col0, 0), min(col0 + ww, w)
    if r_lo > row0:
        dst[:, :r_lo - row0].zero_()
    if r_hi < row0 + rr:
        dst[:, r_hi - row0:].zero_()
    body = dst[:, r_lo - row0:r_hi - row0]
    if c_lo > col0:
        body[:, :, :c_lo - col0].zero_()
    if c_hi < col0 + ww:
        body[:, :, c_hi - col0:].zero_()
    body[:, :, c_lo - col0:c_hi - col0].copy_(src[b0:b0 + nb, r_lo:r_hi, c_lo:c_hi])
    return dst


class _TiledInput:
    """The input of one F(m x m, 3x3) convolution, cut into chunks (a few tile rows of one image or, for small maps
    such as RoI features, several whole images) whose tiles :meth:`transform` takes to the transform domain, ``V =
    B^T d B``, into buffers reused by every chunk (a short last chunk takes a dense prefix of each). Each chunk's
    rows are padded into a slab of their own, so no padded copy of the whole map is ever held."""

    def __init__(self, x: Tensor, tile: int, cout: int):
        n, c, h, w = x.shape
        self.n, self.c, self.mt, self.a = n, c, tile, tile + 2
        self.th, self.tw = -(-h // tile), -(-w // tile)
        aa = self.a * self.a
        self.x = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels-last maps
        per_image = aa * self.th * self.tw * max(c, cout)
        self.images = max(1, min(n, _CHUNK_ELEMENTS // per_image))
        self.rows = self.th if self.images > 1 else max(
            1, min(self.th, _CHUNK_ELEMENTS // (aa * self.tw * max(c, cout))))
        #: Tiles in the largest chunk.
        self.most = self.images * self.rows * self.tw
        self._d = x.new_empty(aa * self.most * c)  # the gathered tiles d, then V
        self._h = x.new_empty(aa * self.most * c)  # B^T d, over the tiles' rows
        # The chunk's rows with the padding: 1 on the top/left, enough on the bottom/right for whole tiles.
        self._slab = x.new_empty(self.images, tile * self.rows + 2, tile * self.tw + 2, c)
        bt, _, _ = _transforms(tile)
        self._bt = bt.to(x.device, torch.float32)

    def chunks(self):
        """(first image, images, first tile row, tile rows) of every chunk."""
        for b0 in range(0, self.n, self.images):
            for r0 in range(0, self.th, self.rows):
                yield b0, min(self.images, self.n - b0), r0, min(self.rows, self.th - r0)

    def transform(self, b0: int, nb: int, r0: int, r: int) -> Tensor:
        """V of the chunk's tiles as (a * a, nb * r * tw, C), in the chunk buffer (valid until the next call)."""
        a, mt, tw, c = self.a, self.mt, self.tw, self.c
        t = nb * r * tw
        slab = _window(self._slab[:nb, :mt * r + 2], self.x, b0, mt * r0 - 1, -1)
        sn, sh, sw, sc = slab.stride()
        # (a, a, nb, r, tw, C) view of the overlapping tiles (stride m, side a), gathered into a * a rows.
        tiles = slab.as_strided((a, a, nb, r, tw, c), (sh, sw, sn, mt * sh, mt * sw, sc), slab.storage_offset())
        d = self._d[:a * a * t * c]
        d.view(a, a, nb, r, tw, c).copy_(tiles)
        # Over the tile's rows (one product), then over its columns (one per row), back into d's buffer.
        hv = self._h[:a * a * t * c]
        torch.mm(self._bt, d.view(a, a * t * c), out=hv.view(a, a * t * c))
        torch.bmm(self._bt.expand(a, a, a), hv.view(a, a, t * c), out=d.view(a, a, t * c))
        return d.view(a * a, t, c)


@torch.no_grad()
def conv3x3_winograd(x: Tensor, weight_t: Tensor, bias: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` (then ReLU with ``relu``) by F(m x m, 3x3), m = 4, 5 or 6
    as ``weight_t`` was transformed for.

    Args:
        x: (N, C_in, H, W) float32, any memory format (channels-last reads without a copy).
        weight_t: (36, 49 or 64, C_in, C_out) float32, :func:`winograd_weight` of the (C_out, C_in, 3, 3) weight
            for tile 4, 5 or 6 (:func:`winograd_tile` picks the cheapest for a map size).
        bias: optional (C_out,) float32.
    Returns (N, C_out, H, W) float32, channels-last. No autograd.
    """
    if x.dim() != 4 or x.dtype != torch.float32 or weight_t.dtype != torch.float32:
        raise ValueError(f"conv3x3_winograd: expected float32 (N, C, H, W) input and weight, got {x.dtype} "
                         f"{tuple(x.shape)} and {weight_t.dtype}")
    n, c, h, w = x.shape
    sizes = {(tile + 2) ** 2: tile for tile in WINOGRAD_TILES}  # 36, 49, 64
    if weight_t.dim() != 3 or weight_t.shape[0] not in sizes or weight_t.shape[1] != c:
        raise ValueError(f"conv3x3_winograd: weight_t must be ({' or '.join(map(str, sizes))}, {c}, C_out) "
                         f"(winograd_weight of a (C_out, {c}, 3, 3) weight), got {tuple(weight_t.shape)}")
    mt = sizes[weight_t.shape[0]]  # outputs per tile side
    a = mt + 2  # input tile side
    aa = a * a
    cout = weight_t.shape[2]
    tiled = _TiledInput(x, mt, cout)
    th, tw = tiled.th, tiled.tw
    _, _, at = _transforms(mt)
    at = at.to(x.device, torch.float32)
    at_b = at.expand(mt, mt, a)
    # Written through its (N, H, W, C) view; the channels-last tensor itself is returned (not a view: autograd
    # functions return it, and a view made inside one may not be modified in place).
    result = torch.empty(n, cout, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out = result.permute(0, 2, 3, 1)
    m_buf = x.new_empty(aa * tiled.most * cout)
    g_buf = x.new_empty(mt * a * tiled.most * cout)
    y_buf = x.new_empty(mt * mt * tiled.most * cout)
    for b0, nb, r0, r in tiled.chunks():
        t = nb * r * tw
        v = tiled.transform(b0, nb, r0, r)
        m = m_buf[:aa * t * cout].view(aa, t, cout)
        torch.bmm(v, weight_t, out=m)
        # Y = A^T M A, the same way as V: over the rows, then over the columns.
        g = g_buf[:mt * a * t * cout]
        torch.mm(at, m.view(a, a * t * cout), out=g.view(mt, a * t * cout))
        y = y_buf[:mt * mt * t * cout]
        torch.bmm(at_b, g.view(mt, a, t * cout), out=y.view(mt, mt, t * cout))
        _put_tiles(out[b0:b0 + nb], y.view(mt, mt, nb, r, tw, cout).permute(2, 3, 0, 4, 1, 5), mt * r0)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if relu:
        out.relu_()
    return result


def _put_tiles(out: Tensor, tiles: Tensor, row0: int) -> None:
    """Copy ``tiles`` (nb, r, m, tw, m, C), the m x m output blocks of r tile rows, into ``out`` (nb, H, W, C) from
    row ``row0``, dropping what falls beyond the map (the last tile row and column may cover less than m): the
    output is written at its own size, never through a padded copy."""
    nb, r, mt, tw, _, c = tiles.shape
    h, w = out.shape[1:3]
    rf, twf = min(r, (h - row0) // mt), w // mt  # whole tile rows and columns
    hr, wr = min(h - row0 - mt * rf, mt), w - mt * twf  # the rows and columns of the partial ones
    body = out[:, row0:row0 + mt * rf]
    if rf:
        body[:, :, :mt * twf].view(nb, rf, mt, twf, mt, c).copy_(tiles[:, :rf, :, :twf])
        if wr:
            body[:, :, mt * twf:].view(nb, rf, mt, wr, c).copy_(tiles[:, :rf, :, twf, :wr])
    if hr > 0 and rf < r:
        rest = out[:, row0 + mt * rf:row0 + mt * rf + hr]
        rest[:, :, :mt * twf].view(nb, hr, twf, mt, c).copy_(tiles[:, rf, :hr, :twf])
        if wr:
            rest[:, :, mt * twf:].copy_(tiles[:, rf, :hr, twf, :wr])


@torch.no_grad()
def conv3x3_winograd_weight_grad(x: Tensor, grad_out: Tensor, tile: int = 4) -> Tensor:
    """The weight gradient of ``conv2d(x, weight, stride=1, padding=1)`` for the output gradient ``grad_out``, by
    F(tile x tile, 3x3) in the transform domain: with the forward's ``V = B^T d B`` of every input tile and the
    output gradient taken back through ``Y = A^T M A`` (``dM = A dY A^T``), ``dU[k] = sum over tiles V[k]^T dM[k]``
    (a * a matrix products (C_in, tiles) @ (tiles, C_out), 4x to 5x fewer multiply-adds than the direct
    correlation), then ``dg = G^T dU G`` through ``U = G g G^T``.

    Args:
        x: (N, C_in, H, W) float32, the convolution's input.
        grad_out: (N, C_out, H, W) float32.
    Returns (C_out, C_in, 3, 3) float32.
    """
    if x.dim() != 4 or grad_out.dim() != 4 or x.dtype != torch.float32 or grad_out.dtype != torch.float32 \
            or x.shape[0] != grad_out.shape[0] or x.shape[2:] != grad_out.shape[2:]:
        raise ValueError(f"conv3x3_winograd_weight_grad: expected float32 (N, C_in, H, W) input and (N, C_out, H, W) "
                         f"gradient, got {x.dtype} {tuple(x.shape)} and {grad_out.dtype} {tuple(grad_out.shape)}")
    if tile not in WINOGRAD_TILES:
        raise ValueError(f"conv3x3_winograd_weight_grad: tile must be one of {WINOGRAD_TILES}, got {tile!r}")
    c, cout = x.shape[1], grad_out.shape[1]
    mt, a = tile, tile + 2
    aa = a * a
    tiled = _TiledInput(x, mt, cout)
    tw = tiled.tw
    dy = grad_out.permute(0, 2, 3, 1)  # (N, H, W, C_out)
    # The chunk's output-gradient rows, zero beyond the map: the outputs a tile covers there get no gradient.
    dy_slab = x.new_empty(tiled.images, mt * tiled.rows, mt * tw, cout)
    _, g64, at = _transforms(mt)
    a_ = at.t().contiguous().to(x.device, torch.float32)  # A: (a, m)
    a_b = a_.expand(a, a, mt)
    y_buf = x.new_empty(mt * mt * tiled.most * cout)
    z_buf = x.new_empty(a * mt * tiled.most * cout)
    dm_buf = x.new_empty(aa * tiled.most * cout)
    du = x.new_zeros(aa, c, cout)
    for b0, nb, r0, r in tiled.chunks():
        t = nb * r * tw
        v = tiled.transform(b0, nb, r0, r)
        # The output gradient's m x m blocks (not overlapping), to the transform domain: dM = A dY A^T.
        slab = _window(dy_slab[:nb, :mt * r], dy, b0, mt * r0, 0)
        gn, gh, gw, gc = slab.stride()
        blocks = slab.as_strided((mt, mt, nb, r, tw, cout), (gh, gw, gn, mt * gh, mt * gw, gc), slab.storage_offset())
        y = y_buf[:mt * mt * t * cout]
        y.view(mt, mt, nb, r, tw, cout).copy_(blocks)
        z = z_buf[:a * mt * t * cout]
        torch.mm(a_, y.view(mt, mt * t * cout), out=z.view(a, mt * t * cout))
        dm = dm_buf[:aa * t * cout]
        torch.bmm(a_b, z.view(a, mt, t * cout), out=dm.view(a, a, t * cout))
        du.baddbmm_(v.transpose(1, 2), dm.view(aa, t, cout))
    # dg = G^T dU G as two plain products on the whole bank: over p, then over q (a batch of 3).
    gt = g64.t().to(x.device, torch.float32)  # (3, a)
    t1 = (gt @ du.view(a, a * c * cout)).view(3, a, c * cout)  # [k, q, (i, o)]
    dg = torch.bmm(gt.expand(3, 3, a), t1)  # [k, l, (i, o)]
    return dg.view(3, 3, c, cout).permute(3, 2, 0, 1)


class _Conv3x3Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tile):
        ctx.save_for_backward(x, weight)
        ctx.tile, ctx.has_bias = tile, bias is not None
        return conv3x3_winograd(x, winograd_weight(weight, tile, torch.float32), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # A stride-1 3x3 convolution's input gradient is the 3x3 convolution of the output gradient with the
            # flipped, transposed filter: the same Winograd product, with C_in and C_out swapped.
            flipped = weight.detach().flip(2, 3).permute(2, 3, 0, 1)  # (3, 3, C_out, C_in)
            dx = conv3x3_winograd(grad_out, _transform_filters(flipped, ctx.tile, torch.float32))
        if ctx.needs_input_grad[1]:
            dw = conv3x3_winograd_weight_grad(x, grad_out, ctx.tile)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad_out.sum((0, 2, 3))
        return dx, dw, db, None


def conv3x3_winograd_autograd(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                              tile: Optional[int] = None) -> Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` by Winograd with gradients: the forward, the input gradient
    and the weight gradient all in the F(tile x tile, 3x3) transform domain (:func:`conv3x3_winograd`,
    :func:`conv3x3_winograd_weight_grad`), the tile :func:`winograd_tile` picks by default. float32; x (N, C_in, H,
    W), weight (C_out, C_in, 3, 3), bias (C_out,) or None; returns (N, C_out, H, W) channels-last. Gradients equal
    the direct convolution's up to float rounding (about 1e-5 of their scale)."""
    if tile is None:
        tile = winograd_tile(x.shape[2], x.shape[3])
    return _Conv3x3Winograd.apply(x, weight, bias, tile)
