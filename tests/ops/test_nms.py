import importlib

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.ops import _backend
from maskrcnn.ops._backend import get_backend, resolve, set_backend, torchvision_ops_available, use_backend
from maskrcnn.ops.nms import batched_nms, batched_nms_limited, nms

# The module, not the function `maskrcnn.ops.nms` that the package exports under the same name.
nms_module = importlib.import_module("maskrcnn.ops.nms")

BACKENDS = ["native", "torchvision"]
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


def _rpn_like(n, dtype=torch.float32, generator=None):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 800
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 190 + 10
    return torch.cat([xy, xy + wh], 1).to(dtype)


def _clustered(n, dtype=torch.float32, objects=20):
    """Jittered copies of a few objects, as RPN proposals look: heavy suppression, long chains."""
    centers = torch.rand(objects, 2, dtype=torch.float64) * 600
    sizes = torch.rand(objects, 2, dtype=torch.float64) * 150 + 10
    which = torch.randint(0, objects, (n,))
    ctr = centers[which] + torch.randn(n, 2, dtype=torch.float64) * 6
    wh = sizes[which] * (1 + 0.1 * torch.randn(n, 2, dtype=torch.float64)).clamp(min=0.2)
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1).to(dtype)


def _per_class_oracle(boxes, scores, idxs, iou_threshold):
    """Per-class torchvision.ops.nms on untouched coordinates, merged by (-score, index)."""
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool)
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        keep[members[torchvision.ops.nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def _assert_same_nms(boxes, scores, iou_threshold):
    ours = nms(boxes, scores, iou_threshold)
    expected = torchvision.ops.nms(boxes, scores, iou_threshold)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected), (iou_threshold, ours.tolist()[:20], expected.tolist()[:20])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_matches_torchvision_on_random_boxes(backend, dtype):
    for trial in range(8):
        n = int(torch.randint(1, 1200, ()))
        boxes = _rpn_like(n, dtype) if trial % 2 else _clustered(n, dtype)
        scores = torch.rand(n, dtype=dtype)
        for thr in (0.3, 0.5, 0.7, float(torch.rand(()))):
            _assert_same_nms(boxes, scores, thr)


@pytest.mark.parametrize("n", [3000, 6000])
def test_nms_matches_torchvision_at_proposal_scale(backend, n):
    boxes = torch.cat([_rpn_like(n // 2), _clustered(n // 2)])
    scores = torch.rand(n)
    for thr in (0.7, 0.5):
        _assert_same_nms(boxes, scores, thr)
    # Scores quantised to a few levels: thousands of ties spanning many native blocks.
    _assert_same_nms(boxes, (scores * 5).floor(), 0.5)


def _adversarial_cases(dtype):
    def t(rows):
        return torch.tensor(rows, dtype=dtype)

    random = _rpn_like(300, dtype)
    grid = torch.randint(0, 40, (400, 2)).to(dtype)
    grid_boxes = torch.cat([grid, grid + torch.randint(0, 12, (400, 2)).to(dtype)], 1)
    chain = torch.arange(700, dtype=dtype)
    chain_boxes = torch.stack([chain, torch.zeros_like(chain), chain + 10, torch.full_like(chain, 10)], 1)
    # Pairs with IoU 3/10, 7/10, 3/5 and 1/10: exactly the float32 roundings of 0.3, 0.7, 0.6 and 0.1.
    rounded_iou_boxes = t(
        [[0, 0, 3, 1], [0, 0, 10, 1], [0, 0, 7, 1], [20, 0, 23, 1], [20, 0, 25, 1], [40, 0, 41, 1], [40, 0, 50, 1]]
    )
    return {
        "all scores equal": (random, torch.full((300,), 0.5, dtype=dtype)),
        "identical boxes, equal scores": (t([[5.0, 5.0, 20.0, 20.0]] * 50), torch.ones(50, dtype=dtype)),
        "integer grid, few score levels": (grid_boxes, torch.randint(0, 4, (400,)).to(dtype)),
        "zero-area points and lines": (
            t([[3, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 9], [3, 3, 3, 9], [0, 5, 9, 5], [2, 2, 4, 4], [2, 2, 4, 4]]),
            t([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]),
        ),
        "huge and tiny boxes": (
            torch.cat([t([[-1e6, -1e6, 1e6, 1e6], [-1e6, -1e6, 1e6, 1e6 + 1]]), random[:50] * 1e-3]),
            torch.rand(52, dtype=dtype),
        ),
        "over the border": (random - 400, torch.rand(300, dtype=dtype)),
        "suppression chain": (chain_boxes, -chain),
        "float32 IoU equal to a rounded threshold": (
            rounded_iou_boxes,
            t([0.9, 0.8, 0.85, 0.7, 0.6, 0.5, 0.4]),
        ),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_matches_torchvision_on_adversarial_inputs(backend, dtype):
    for name, (boxes, scores) in _adversarial_cases(dtype).items():
        for thr in (0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 1.0, -0.5):
            ours = nms(boxes, scores, thr)
            expected = torchvision.ops.nms(boxes, scores, thr)
            assert torch.equal(ours, expected), (name, thr, ours.tolist()[:20], expected.tolist()[:20])


def test_threshold_compared_in_double_like_the_cpu_kernel(backend):
    # IoU 3/10 rounds to float32 0.30000001 > 0.3: suppressed. IoU 7/10 rounds to 0.69999999 < 0.7: kept.
    scores = torch.tensor([0.9, 0.8])
    assert nms(torch.tensor([[0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 10.0, 1.0]]), scores, 0.3).tolist() == [0]
    assert nms(torch.tensor([[0.0, 0.0, 7.0, 1.0], [0.0, 0.0, 10.0, 1.0]]), scores, 0.7).tolist() == [0, 1]


def test_ties_are_visited_in_index_order(backend):
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [100.0, 0.0, 110.0, 10.0], [0.0, 0.0, 10.0, 9.0]]
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes.flip(0), scores, 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_empty_and_single(backend, dtype):
    empty = nms(torch.zeros((0, 4), dtype=dtype), torch.zeros(0, dtype=dtype), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    one = nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype), torch.tensor([0.1], dtype=dtype), 0.5)
    assert one.tolist() == [0] and one.dtype == torch.int64


def test_nms_accepts_half_precision_and_mixed_dtypes(backend):
    boxes, scores = _clustered(300), torch.rand(300)
    expected = torchvision.ops.nms(boxes.half().float(), scores.half().float(), 0.5)
    assert torch.equal(nms(boxes.half(), scores.half(), 0.5), expected)
    assert torch.equal(nms(boxes, scores.double(), 0.5), torchvision.ops.nms(boxes.double(), scores.double(), 0.5))


@pytest.mark.parametrize("iou", (0.2, 0.5, 0.8))
@pytest.mark.parametrize("scale, zero_point", ((1, 0), (2, 50), (3, 10)))
def test_quantized_boxes_and_scores_match_torchvision_qnms(backend, iou, scale, zero_point):
    # torchvision sends quantized input to its qnms kernel; ours dequantizes. Same indices as torchvision's.
    boxes, scores = _clustered(300) * 2, torch.rand(300) * 100
    qboxes = torch.quantize_per_tensor(boxes, scale=scale, zero_point=zero_point, dtype=torch.quint8)
    qscores = torch.quantize_per_tensor(scores, scale=scale, zero_point=zero_point, dtype=torch.quint8)
    expected = torchvision.ops.nms(qboxes, qscores, iou)
    assert torch.equal(nms(qboxes, qscores, iou), expected)
    assert torch.equal(nms(qboxes.dequantize(), qscores.dequantize(), iou), expected)
    idxs = torch.arange(300) % 3
    assert torch.equal(batched_nms(qboxes, qscores, idxs, iou),
                       batched_nms(qboxes.dequantize(), qscores.dequantize(), idxs, iou))


@pytest.mark.parametrize("device", DEVICES)
def test_native_nms_on_every_device(device):
    boxes, scores = _clustered(800), torch.rand(800)
    with use_backend("native"):
        ours = nms(boxes.to(device), scores.to(device), 0.5)
    assert ours.device.type == device
    assert torch.equal(ours.cpu(), torchvision.ops.nms(boxes, scores, 0.5))


IDX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
def test_batched_nms_matches_per_class_nms(backend, idx_dtype):
    for trial, classes in enumerate((1, 3, 80)):
        n = int(torch.randint(1, 1500, ()))
        boxes = (_clustered(n) if trial % 2 else _rpn_like(n)).round()  # integer: offsets stay exact
        scores = torch.rand(n)
        idxs = torch.randint(0, classes, (n,)).to(idx_dtype)
        for thr in (0.5, 0.7):
            ours = batched_nms(boxes, scores, idxs, thr)
            assert ours.dtype == torch.int64
            assert torch.equal(ours, _per_class_oracle(boxes, scores, idxs, thr)), (trial, thr)
            assert torch.equal(ours, torchvision.ops.batched_nms(boxes, scores, idxs, thr)), (trial, thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_batched_nms_is_exact_per_class_on_float_coordinates(dtype):
    # The coordinate-offset trick rounds float32 coordinates at offsets of many image widths; the
    # native implementation never offsets, so it must equal per-class NMS exactly.
    with use_backend("native"):
        for n, classes in ((900, 80), (2500, 5), (400, 400)):
            boxes, scores = _clustered(n, dtype, objects=30), torch.rand(n, dtype=dtype)
            idxs = torch.randint(0, classes, (n,))
            for thr in (0.3, 0.5, 0.7):
                assert torch.equal(batched_nms(boxes, scores, idxs, thr), _per_class_oracle(boxes, scores, idxs, thr))


def test_batched_nms_never_suppresses_across_classes(backend):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 6)
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5, 0.2])
    idxs = torch.tensor([0, 1, 2, 1, 0, 3])
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [1, 4, 2, 5]
    assert batched_nms(boxes, scores, torch.arange(6), 0.5).tolist() == [1, 3, 4, 2, 5, 0]


def test_batched_nms_of_no_boxes_needs_no_other_argument(backend):
    # torchvision's batched_nms returns before looking at scores and idxs.
    empty = torch.empty((0,), dtype=torch.int64)
    for boxes in (empty, torch.zeros((0, 4))):
        keep = batched_nms(boxes, None, None, None)
        assert keep.shape == (0,) and keep.dtype == torch.int64
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes, None, None, None))


def test_batched_nms_ties_and_empty(backend):
    boxes = torch.cat([_clustered(500).round(), torch.tensor([[1.0, 1.0, 5.0, 5.0]] * 10)])
    scores = torch.cat([(torch.rand(500) * 4).floor(), torch.full((10,), 2.0)])
    idxs = torch.randint(0, 7, (510,))
    ours = batched_nms(boxes, scores, idxs, 0.5)
    expected = _per_class_oracle(boxes, scores, idxs, 0.5)
    assert torch.equal(ours, expected)
    empty = batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int32), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def _iou64(boxes):
    # torchvision's box_iou performs the kernel's exact float operations; compare in double.
    return torchvision.ops.box_iou(boxes, boxes).double()


def _check_greedy_properties(boxes, scores, idxs, thr, keep):
    n = boxes.shape[0]
    assert keep.dtype == torch.int64 and len(set(keep.tolist())) == keep.numel()
    assert bool((scores[keep][1:] <= scores[keep][:-1]).all()), "kept boxes must be sorted by decreasing score"
    iou = _iou64(boxes)
    same = idxs[:, None] == idxs[None, :]
    # A box never suppresses itself; nan IoU (two identical points) never suppresses.
    suppresses = (iou > thr) & same & ~torch.eye(n, dtype=torch.bool)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    pair = suppresses[keep][:, keep]
    assert not bool(pair.any()), "two kept boxes overlap above the threshold"
    # Visiting order: higher score first, equal scores by lower index.
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(n)
    earlier = rank[:, None] < rank[None, :]
    for j in torch.nonzero(~kept).flatten().tolist():
        by = torch.nonzero(kept & suppresses[:, j] & earlier[:, j]).flatten()
        assert by.numel() > 0, f"dropped box {j} is not suppressed by any earlier kept box"
        assert bool((scores[by] >= scores[j]).all())


# (x, y, w, h, score level, class): a small integer world so that overlaps, ties and zero-area boxes abound.
box_lists = st.lists(
    st.tuples(*(st.integers(0, hi) for hi in (30, 30, 15, 15, 4, 3))),
    min_size=0,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(rows=box_lists, thr=st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.7, 0.9]), half_pixel=st.booleans())
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_greedy_properties_hold(backend_name, rows, thr, half_pixel):
    data = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    xy = data[:, :2] * (0.5 if half_pixel else 1.0)
    boxes = torch.cat([xy, xy + data[:, 2:4]], 1)
    scores, idxs = data[:, 4] / 4, data[:, 5].long()
    with use_backend(backend_name):
        _check_greedy_properties(boxes, scores, torch.zeros_like(idxs), thr, nms(boxes, scores, thr))
        _check_greedy_properties(boxes, scores, idxs, thr, batched_nms(boxes, scores, idxs, thr))


def _detection_like(rois=300, classes=80, seed=0, ties=False):
    """Every (RoI, class) pair a candidate, as Fast R-CNN post-processing sees them (score threshold 0)."""
    g = torch.Generator().manual_seed(seed)
    base = _rpn_like(rois, generator=g)
    boxes = (base[:, None, :] + torch.randn(rois, classes, 4, generator=g) * 4).reshape(-1, 4)
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)
    scores = torch.softmax(torch.randn(rois, classes + 1, generator=g) * 0.2, 1)[:, 1:].reshape(-1)
    if ties:
        scores = (scores * 2000).round() / 2000
    labels = torch.arange(1, classes + 1).repeat(rois)
    return boxes, scores, labels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [1, 100, 5000])
def test_batched_nms_limited_equals_the_head_of_per_class_nms(limit, ties):
    boxes, scores, labels = _detection_like(ties=ties)
    expected = _per_class_oracle(boxes, scores, labels, 0.5)[:limit]
    got = batched_nms_limited(boxes, scores, labels, 0.5, limit)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(rows=box_lists, thr=st.sampled_from([0.0, 0.3, 0.5, 0.7]), limit=st.integers(0, 20))
def test_batched_nms_limited_property(rows, thr, limit):
    data = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    boxes = torch.cat([data[:, :2], data[:, :2] + data[:, 2:4]], 1)
    scores, idxs = data[:, 4] / 4, data[:, 5].long()
    expected = _per_class_oracle(boxes, scores, idxs, thr)[:limit] if len(rows) else torch.zeros(0, dtype=torch.long)
    assert torch.equal(batched_nms_limited(boxes, scores, idxs, thr, limit), expected)


def test_batched_nms_limited_rejects_a_negative_limit():
    with pytest.raises(ValueError, match="limit must be >= 0"):
        batched_nms_limited(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, dtype=torch.long), 0.5, -1)


def test_bad_inputs_raise_clear_errors(backend):
    with pytest.raises(ValueError, match=r"boxes must be a \(N, 4\) tensor"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"scores must be a \(N,\) tensor with N = 3"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="idxs must have an integer"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"idxs must be a \(N,\) tensor"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(4, dtype=torch.int64), 0.5)


# Backend selection ---------------------------------------------------------------------------


def test_env_var_selects_and_validates_backend(monkeypatch):
    with use_backend(None):
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
        assert get_backend() == "auto"
        monkeypatch.setenv(_backend.ENV_VAR, "native")
        assert get_backend() == "native" and resolve("nms") == "native"
        monkeypatch.setenv(_backend.ENV_VAR, "cudnn")
        with pytest.raises(ValueError, match=r"'cudnn'.*MASKRCNN_OPS_BACKEND.*native, torchvision, auto"):
            get_backend()
        with pytest.raises(ValueError, match="cudnn"):
            nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        set_backend("torchvision")  # an explicit choice wins over the environment
        assert get_backend() == "torchvision"


def test_set_backend_rejects_bad_names_and_use_backend_restores():
    before = get_backend()
    for bad in ("fast", "", "Native2", 3):
        with pytest.raises(ValueError, match=r"invalid maskrcnn ops backend .*set_backend"):
            set_backend(bad)
    assert get_backend() == before
    with use_backend("native"):
        assert get_backend() == "native"
        with use_backend("torchvision"):
            assert get_backend() == "torchvision"
        assert get_backend() == "native"
    assert get_backend() == before
    with pytest.raises(ValueError, match="unknown op_name 'nmz'"):
        resolve("nmz")


def test_auto_follows_preference_table_and_falls_back(monkeypatch):
    assert torchvision_ops_available()
    with use_backend("auto"):
        for op, preferred in _backend.AUTO_PREFERENCE.items():
            assert resolve(op) == preferred
        monkeypatch.setattr(_backend, "_torchvision_ok", False)
        assert all(resolve(op) == "native" for op in _backend.AUTO_PREFERENCE)
    with use_backend("torchvision"):
        with pytest.raises(RuntimeError, match="torchvision's compiled ops could not be loaded"):
            resolve("nms")


def test_availability_probe_never_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated missing kernel")

    monkeypatch.setattr(_backend, "_torchvision_ok", None)
    monkeypatch.setattr(torch.ops.torchvision, "nms", broken)
    assert torchvision_ops_available() is False
    assert torchvision_ops_available() is False  # cached
    monkeypatch.undo()
    _backend._torchvision_ok = None
    assert torchvision_ops_available() is True


@pytest.mark.parametrize("name,native_calls", [("native", 1), ("torchvision", 0), ("auto", 0)])
def test_dispatch_follows_backend(monkeypatch, name, native_calls):
    calls = []
    real_nms, real_batched = nms_module.nms_native, nms_module.batched_nms_native
    monkeypatch.setattr(nms_module, "nms_native", lambda *a: calls.append("nms") or real_nms(*a))
    monkeypatch.setattr(nms_module, "batched_nms_native", lambda *a: calls.append("batched") or real_batched(*a))
    boxes, scores = _clustered(50), torch.rand(50)
    with use_backend(name):
        nms(boxes, scores, 0.5)
        batched_nms(boxes, scores, torch.zeros(50, dtype=torch.int64), 0.5)
    assert calls == ["nms", "batched"] * native_calls
