"""RESNETS.NORM kinds (FrozenBN, BN, SyncBN, GN), the SyncBN conversion and the from-scratch guard."""
import os

import pytest
import torch
from torch import nn

from maskrcnn.config import ConfigError, get_cfg
from maskrcnn.modeling.backbone.frozen_bn import FrozenBatchNorm2d
from maskrcnn.modeling.backbone.norms import (GN_GROUPS, check_trainable_from_scratch, convert_sync_batchnorm,
                                               frozen_bn_layers, get_norm, revert_sync_batchnorm)
from maskrcnn.modeling.backbone.resnet import ResNet
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_norm_kinds():
    assert isinstance(get_norm("FrozenBN", 64), FrozenBatchNorm2d)
    assert type(get_norm("BN", 64)) is nn.BatchNorm2d
    assert type(get_norm("SyncBN", 64)) is nn.BatchNorm2d  # converted only under DDP
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == GN_GROUPS and gn.eps == 1e-5
    with pytest.raises(ValueError, match="divisible by 32"):
        get_norm("GN", 48)
    narrow = get_norm("GN", 8)  # narrower than 32 channels: one group per channel
    assert narrow.num_groups == 8 and narrow.num_channels == 8


def test_narrow_gn_body_and_fpn():
    """The eighth-width from-scratch body (8-64 channels) and a 16-channel FPN build with GN and run."""
    from maskrcnn.modeling.backbone.fpn import FPN

    body = ResNet(18, norm="GN", freeze_at=0, stem_out_channels=8, res2_out_channels=8,
                  return_stages=("res2", "res3", "res4", "res5"))
    assert {m.num_groups for m in body.modules() if isinstance(m, nn.GroupNorm)} == {8, 16, 32}
    fpn = FPN([8, 16, 32, 64], 16, use_gn=True)
    feats = body(torch.rand(2, 3, 64, 64))
    outs = fpn([feats[k] for k in ("res2", "res3", "res4", "res5")])
    assert [o.shape[1] for o in outs] == [16] * len(outs)
    with pytest.raises(ValueError, match="FPN use_gn=True with out_channels=48: GN needs channels divisible by 32"):
        FPN([8, 16], 48, use_gn=True)
    with pytest.raises(ValueError, match="SyncBN"):
        get_norm("LayerNorm", 64)


def test_syncbn_resnet_trains_like_bn_on_one_process():
    torch.manual_seed(0)
    a = ResNet(18, norm="SyncBN", freeze_at=0, return_stages=("res3",))
    torch.manual_seed(0)
    b = ResNet(18, norm="BN", freeze_at=0, return_stages=("res3",))
    assert convert_sync_batchnorm(a, "SyncBN", world_size=1, device_type="cpu") is a
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(a(x)["res3"], b(x)["res3"], rtol=0, atol=0)


def test_syncbn_conversion_under_ddp_keeps_parameters_and_keys():
    model = ResNet(18, norm="SyncBN", freeze_at=0, return_stages=("res2",))
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    converted = convert_sync_batchnorm(model, "SyncBN", world_size=2, device_type="cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == keys and [id(p) for p in converted.parameters()] == params
    back = revert_sync_batchnorm(converted)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    assert list(back.state_dict()) == keys and [id(p) for p in back.parameters()] == params
    # BN (not SyncBN) is never converted; SyncBN across CPU processes is refused with the fix.
    bn = ResNet(18, norm="BN", freeze_at=0, return_stages=("res2",))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in convert_sync_batchnorm(bn, "BN", 2, "cuda").modules())
    with pytest.raises(ValueError, match="needs CUDA.*RESNETS.NORM 'BN'"):
        convert_sync_batchnorm(model, "SyncBN", world_size=2, device_type="cpu")


def _cfg(**kv):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "quick_schedules", "e2e_mask_rcnn_R-18-FPN_smoke.yaml"))
    cfg.merge_from_list([x for pair in kv.items() for x in pair])
    return cfg


@pytest.mark.parametrize("norm, freeze_at", [("FrozenBN", 0), ("BN", 2), ("GN", 0)])
def test_from_scratch_guard(norm, freeze_at):
    model = Generalized_RCNN(_cfg(**{"RESNETS.NORM": norm, "RESNETS.FREEZE_AT": freeze_at}))
    if norm == "GN":  # GN with nothing frozen: trainable from scratch
        assert frozen_bn_layers(model) == []
        check_trainable_from_scratch(model)
        return
    with pytest.raises(ConfigError) as e:
        check_trainable_from_scratch(model, "my.yaml")
    text = str(e.value)
    assert text.startswith("my.yaml: training from scratch") and "Conv_Body.conv_body.res1.bn1" in text
    assert "RESNETS.NORM GN" in text and "RESNETS.FREEZE_AT 0" in text and "LOAD_IMAGENET_PRETRAINED_WEIGHTS" in text


def test_the_demo_and_scratch_configs_pass_the_guard():
    for rel in ("quick_schedules/e2e_mask_rcnn_R-18-FPN_synthetic_cpu.yaml",
                "scratch/e2e_mask_rcnn_R-18-FPN_GN_scratch_synthetic.yaml",
                "scratch/e2e_mask_rcnn_R-18-FPN_SyncBN_scratch_synthetic.yaml"):
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", rel))
        check_trainable_from_scratch(Generalized_RCNN(cfg), rel)
