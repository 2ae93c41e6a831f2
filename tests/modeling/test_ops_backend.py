"""OPS_BACKEND is a per-model library setting: a model built from a config runs the kernels that config names (seen
at dispatch, and by counting calls into torchvision's kernels), whatever another model or the environment says."""
import pickle

import pytest
import torch
import torchvision

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.ops_backend import apply_ops_backend
from maskrcnn.ops import _backend

pytestmark = pytest.mark.skipif(not _backend.torchvision_ops_available(),
                                reason="torchvision's compiled ops do not load here")


def tiny_cfg(backend):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body", "FPN.DIM", 16,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
        "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 2, "FAST_RCNN.MLP_HEAD_DIM", 32,
        "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up", "MRCNN.RESOLUTION", 28,
        "MRCNN.ROI_XFORM_RESOLUTION", 14, "MRCNN.ROI_XFORM_SAMPLING_RATIO", 2, "MRCNN.DIM_REDUCED", 16,
        "MRCNN.DILATION", 1, "MODEL.NUM_CLASSES", 3, "TEST.SCALE", 64, "TEST.MAX_SIZE", 96,
        "TEST.RPN_PRE_NMS_TOP_N", 100, "TEST.RPN_POST_NMS_TOP_N", 20, "TEST.SCORE_THRESH", 0.0,
        "OPS_BACKEND", backend,
    ])
    return cfg


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: Generalized_RCNN(tiny_cfg(name)).eval() for name in ("native", "torchvision", "auto")}


class Dispatch:
    """Records what every op resolved to and counts calls into torchvision's Python-level kernels."""

    def __init__(self, monkeypatch):
        self.resolved = []
        self.tv_calls = {"roi_align": 0, "batched_nms": 0}
        real_resolve = _backend.resolve

        def resolve(op):
            out = real_resolve(op)
            self.resolved.append((op, out))
            return out

        monkeypatch.setattr(_backend, "resolve", resolve)
        for name in self.tv_calls:
            real = getattr(torchvision.ops, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                self.tv_calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(torchvision.ops, name, counted)

    def implementations(self, op):
        return {impl for o, impl in self.resolved if o == op}


@pytest.fixture
def dispatch(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    return Dispatch(monkeypatch)


def _image():
    return [torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(2))]


@torch.no_grad()
@pytest.mark.parametrize("backend", ["native", "torchvision"])
def test_model_runs_the_backend_of_its_config(models, dispatch, backend):
    models[backend](_image())
    assert dispatch.implementations("nms") == {backend}
    assert dispatch.implementations("roi_align") == {backend}
    if backend == "torchvision":
        assert dispatch.tv_calls["roi_align"] > 0 and dispatch.tv_calls["batched_nms"] > 0
    else:
        assert dispatch.tv_calls == {"roi_align": 0, "batched_nms": 0}
    assert _backend.get_backend() == "auto"  # nothing leaks out of the forward


@torch.no_grad()
def test_a_head_called_directly_runs_its_models_backend(models, dispatch):
    feats = [torch.rand(1, 16, 64 // s, 96 // s) for s in (4, 8, 16, 32, 64)]
    rois = [torch.tensor([[4.0, 4, 40, 30], [10, 12, 60, 50]])]
    models["torchvision"].Box_Head(feats, rois)
    assert dispatch.tv_calls["roi_align"] > 0
    before = dispatch.tv_calls["roi_align"]
    models["native"].Box_Head(feats, rois)
    assert dispatch.tv_calls["roi_align"] == before


@torch.no_grad()
def test_auto_defers_to_the_environment_then_the_auto_rule(models, dispatch, monkeypatch):
    models["auto"](_image())
    # The documented "auto" rule: nms from torchvision's kernel, roi_align pure PyTorch.
    assert dispatch.implementations("nms") == {"torchvision"}
    assert dispatch.implementations("roi_align") == {"native"}
    dispatch.resolved.clear()
    monkeypatch.setenv(_backend.ENV_VAR, "native")
    models["auto"](_image())
    assert dispatch.implementations("nms") == {"native"}
    # A model whose config names a backend is not overridden by the environment.
    dispatch.resolved.clear()
    models["torchvision"](_image())
    assert dispatch.implementations("nms") == {"torchvision"}


@torch.no_grad()
def test_explicit_set_backend_wins_over_the_config(models, dispatch):
    with _backend.use_backend("native"):
        models["torchvision"](_image())
    assert dispatch.implementations("nms") == {"native"}
    assert dispatch.tv_calls["roi_align"] == 0


def test_scope_is_left_when_the_forward_raises(models):
    with pytest.raises(Exception):
        models["native"]([torch.rand(2, 5, 5)])  # not a 3-channel image
    assert _backend._scope_stack() == []
    assert _backend.get_backend() == "auto"


def test_apply_ops_backend_validates_and_auto_installs_nothing():
    module = torch.nn.Sequential(torch.nn.Identity())
    assert apply_ops_backend(module, "auto") == "auto"
    assert not module._forward_pre_hooks and not module[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="invalid maskrcnn ops backend 'cuda'.*OPS_BACKEND"):
        apply_ops_backend(module, "cuda")


def test_scoped_backend_nests_and_stays_below_set_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torchvision")
    with _backend.scoped_backend("native") as active:
        assert active == "native"
        with _backend.scoped_backend("torchvision"):
            assert _backend.get_backend() == "torchvision"
        assert _backend.get_backend() == "native"
        with _backend.use_backend("torchvision"):
            assert _backend.get_backend() == "torchvision"
    assert _backend.get_backend() == "torchvision"  # the environment again
    with pytest.raises(RuntimeError, match="without a matching push_scope"):
        _backend.pop_scope()


def test_model_with_a_backend_pickles_and_keeps_it(models, dispatch):
    loaded = pickle.loads(pickle.dumps(models["torchvision"]))  # as torch.save(model) or a spawned worker would
    with torch.no_grad():
        loaded(_image())
    assert loaded.ops_backend == "torchvision"
    assert dispatch.implementations("roi_align") == {"torchvision"}
