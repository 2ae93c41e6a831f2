"""The speed transforms act on what modules declare (conv/BN pairs, fp32 islands), fail loudly when asked for and
finding nothing, run AMP one way, and return their hooks instead of hiding them on the model."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from maskrcnn.config import ConfigError, get_cfg
from maskrcnn.engine import speed
from maskrcnn.engine.amp import AMP_DTYPES
from maskrcnn.engine.inference import inference_on_dataset
from maskrcnn.modeling.backbone.frozen_bn import FrozenBatchNorm2d, find_conv_bn_pairs
from maskrcnn.modeling.backbone.resnet import ResNet
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

sys.path.insert(0, os.path.dirname(__file__))
# _one_thread: test_speed's autouse fixture, used here too (tiny tensors run fastest on one thread).
from test_speed import _one_thread, images, randomize_frozen_bn, tiny_cfg, tiny_model  # noqa: E402,F401

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quick_schedules",
                    "e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# --- markers --------------------------------------------------------------------------------------------------------
def test_detector_declares_the_fp32_islands_the_transform_used_to_find_by_path(model):
    islands, outputs = speed.find_fp32_islands(model)
    assert [id(m) for m in islands] == [id(model.RPN.RPN_cls_score), id(model.RPN.RPN_bbox_pred),
                                        id(model.Box_Outs)]
    assert [id(m) for m in outputs] == [id(model.Mask_Outs)]


class _Renamed(nn.Module):
    """A conv/BN pair under names no convention would guess, declared by the module."""

    def __init__(self):
        super().__init__()
        self.project = nn.Conv2d(3, 4, 3, padding=1)
        self.affine = FrozenBatchNorm2d(4)

    def conv_bn_pairs(self):
        return [("project", "affine")]

    def forward(self, x):
        return self.affine(self.project(x))


class _Undeclared(nn.Module):
    """Detectron-style names but no declaration: nothing says bn1 follows conv1, so nothing folds it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = FrozenBatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv1(x)) + 1


def test_both_bn_folds_act_on_exactly_the_pairs_of_the_one_pair_finder():
    torch.manual_seed(0)
    body = randomize_frozen_bn(ResNet(18, return_stages=("res2", "res3"), freeze_at=0)).eval()
    net = nn.ModuleDict({"body": body, "renamed": randomize_frozen_bn(_Renamed()),
                         "undeclared": randomize_frozen_bn(_Undeclared())})
    declared = {(id(p.parent), p.conv_name) for p in find_conv_bn_pairs(net)}
    assert (id(net["renamed"]), "project") in declared
    assert not any(parent == id(net["undeclared"]) for parent, _ in declared)
    # stem 1 + 4 blocks x 2 + 1 downsample shortcut, and the renamed pair
    assert len(declared) == 11

    inference, training = copy.deepcopy(net), copy.deepcopy(net)
    assert speed.fold_frozen_bn(inference) == 11
    assert speed.fold_frozen_bn_for_training(training) == 11
    folded_inference = {(id(p.parent), p.conv_name) for p in find_conv_bn_pairs(inference)
                        if isinstance(p.norm, nn.Identity)}
    folded_training = {(id(p.parent), p.conv_name) for p in find_conv_bn_pairs(training)
                       if isinstance(p.conv, speed.FrozenBNConv2d)}
    assert len(folded_inference) == len(folded_training) == 11
    for folded in (inference, training):
        assert isinstance(folded["undeclared"].bn1, FrozenBatchNorm2d)
        assert type(folded["undeclared"].bn1) is FrozenBatchNorm2d  # not turned into the training fold's identity
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        for folded in (inference, training):
            torch.testing.assert_close(folded["renamed"](x), net["renamed"](x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(folded["undeclared"](x), net["undeclared"](x), rtol=0, atol=0)


def test_channels_last_weights_make_the_resnet_take_channels_last_input():
    body = randomize_frozen_bn(ResNet(18, return_stages=("res2",))).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = body(x)["res2"]
        assert speed.to_channels_last(body) > 0
        out = body(x)["res2"]
    assert out.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _all_hooks(body) == 0


# --- loud failures --------------------------------------------------------------------------------------------------
def test_inference_transform_with_nothing_to_do_raises_naming_the_key():
    gn_body = ResNet(18, return_stages=("res2",), norm="GN", freeze_at=0)
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=r"TEST\.FUSE_FROZEN_BN = True .*GroupNorm.*Set TEST.FUSE_FROZEN_BN False"):
        speed.prepare_for_inference(copy.deepcopy(gn_body), cfg)
    with pytest.raises(ConfigError, match=r"fold_bn=True"):
        speed.prepare_for_inference(copy.deepcopy(gn_body), fold_bn=True)
    cfg.merge_from_list(["TEST.FUSE_FROZEN_BN", False, "TEST.AMP", "bf16"])
    with pytest.raises(ConfigError, match=r"TEST\.AMP = 'bf16': no module of ResNet declares `fp32_island"):
        speed.prepare_for_inference(copy.deepcopy(gn_body), cfg)
    with pytest.raises(ConfigError, match=r"TEST\.CHANNELS_LAST = True .*no 4-D parameter"):
        speed.prepare_for_inference(nn.Linear(3, 2), fold_bn=False)
    # What the config switched off, or what does not apply (fusion without folding), is not an error.
    speed.prepare_for_inference(copy.deepcopy(gn_body), fold_bn=False, amp="")


def test_fusion_without_anything_to_fuse_raises():
    if not speed.onednn_fusion_available():
        pytest.skip("this PyTorch build has no oneDNN fused convolutions: the feature does not apply")
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"TEST\.FUSE_CONV_ACTIVATIONS = True .*no folded ResNet block"):
        speed.prepare_for_inference(seq, get_cfg())


def test_training_fold_without_frozen_bn_raises_and_the_shipped_bn_config_says_so():
    cfg = tiny_cfg(**{"RESNETS.NORM": "BN", "RESNETS.FREEZE_AT": 0})
    model = Generalized_RCNN(cfg)
    with pytest.raises(ConfigError, match=r"TRAIN\.FUSE_FROZEN_BN = True .*Set TRAIN.FUSE_FROZEN_BN False"):
        speed.prepare_for_training(model, cfg)
    demo = get_cfg()
    demo.merge_from_file(DEMO)
    assert demo.RESNETS.NORM == "BN" and demo.RESNETS.FREEZE_AT == 0 and demo.TRAIN.FUSE_FROZEN_BN is False
    speed.prepare_for_training(Generalized_RCNN(demo), demo)


def test_preparing_twice_is_not_an_error(model):
    once = speed.prepare_for_training(copy.deepcopy(model), fold_bn=True, channels_last=False)
    speed.prepare_for_training(once, fold_bn=True, channels_last=False)
    fast = speed.prepare_for_inference(copy.deepcopy(model), fold_bn=True, channels_last=True, amp="")
    speed.prepare_for_inference(fast, fold_bn=True, channels_last=True, amp="")


# --- AMP: one mechanism, handles returned ---------------------------------------------------------------------------
def test_amp_hooks_come_back_as_a_handle_and_removing_it_restores_the_model(model):
    ims = images()
    with torch.no_grad():
        ref = model(ims)
        fast, handle = speed.prepare_for_inference(copy.deepcopy(model), fold_bn=False, channels_last=False,
                                                   amp="bf16", return_handle=True)
        assert handle.amp == "bf16" and len(handle.handles) == _all_hooks(fast) > 0
        bf16 = fast(ims)
        assert any(not torch.equal(a["scores"], b["scores"]) for a, b in zip(bf16, ref))
        handle.remove()
        assert _all_hooks(fast) == 0 and handle.amp == ""
        restored = fast(ims)
    for a, b in zip(restored, ref):
        for key in b:
            assert torch.equal(a[key], b[key]), key
    assert not any(name.startswith("_speed") for m in fast.modules() for name in vars(m))
    # Without AMP the handle holds nothing and its region is a null context.
    plain, handle = speed.prepare_for_inference(copy.deepcopy(model), amp="", return_handle=True)
    assert handle.handles == [] and _all_hooks(plain) == 0
    with handle.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_amp_is_one_mechanism_with_the_same_results_as_before(model):
    """Before, the inference loop also entered autocast around the hooked model; now the hooks alone do it, and
    part-by-part callers enter the same region through the handle."""
    ims = images()
    fast, handle = speed.prepare_for_inference(copy.deepcopy(model), amp="bf16", return_handle=True)
    feats_in_forward = []
    fast.Conv_Body.register_forward_hook(lambda m, a, out: feats_in_forward.append(out))
    with torch.no_grad():
        hooked = fast(ims)
        with torch.autocast("cpu", dtype=AMP_DTYPES["bf16"]):  # the old loop's extra autocast
            doubled = fast(ims)
        image_list, _ = fast.preprocess(ims)
        with handle.autocast():
            part = fast.Conv_Body(image_list.tensors)
    for a, b in zip(hooked, doubled):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for a, b in zip(part, feats_in_forward[0]):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)

    # The inference loop (one image per batch here) runs the model as it is: the same bf16 numbers.
    with torch.no_grad():
        singles = [fast([im])[0] for im in ims]
    dataset = [(im, {"image_id": i}) for i, im in enumerate(ims)]
    records = inference_on_dataset(fast, _ListDataset(dataset), log=lambda m: None)
    for rec, out in zip(records, singles):
        assert rec["labels"] == [int(v) for v in out["labels"]]
        assert rec["scores"] == [round(v, 6) for v in out["scores"].float().tolist()]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
