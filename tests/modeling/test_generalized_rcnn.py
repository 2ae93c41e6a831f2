"""Generalized_RCNN end to end on tiny inputs: training losses, gradients, frozen parts, inference contract."""
import pytest
import torch
from torch import nn

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN

LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}


def small_cfg(kind: str, **extra):
    cfg = get_cfg()
    if kind == "fpn":
        cfg.merge_from_list([
            "MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body",
            "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
            "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 2, "FAST_RCNN.MLP_HEAD_DIM", 64, "FPN.DIM", 32,
            "MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs", "MRCNN.RESOLUTION", 28,
            "MRCNN.ROI_XFORM_RESOLUTION", 14, "MRCNN.ROI_XFORM_SAMPLING_RATIO", 2, "MRCNN.DIM_REDUCED", 32,
            "MRCNN.DILATION", 1,
        ])
    elif kind == "c4":
        cfg.merge_from_list(["MODEL.CONV_BODY", "ResNet.ResNet50_conv4_body"])
    cfg.merge_from_list([
        "MODEL.NUM_CLASSES", 4, "TRAIN.SCALES", "(96,)", "TRAIN.MAX_SIZE", 128, "TEST.SCALE", 96,
        "TEST.MAX_SIZE", 128, "TRAIN.RPN_PRE_NMS_TOP_N", 300, "TRAIN.RPN_POST_NMS_TOP_N", 64,
        "TEST.RPN_PRE_NMS_TOP_N", 300, "TEST.RPN_POST_NMS_TOP_N", 32, "TRAIN.BATCH_SIZE_PER_IM", 32,
        "TRAIN.RPN_BATCH_SIZE_PER_IM", 64, "TEST.SCORE_THRESH", 0.0,
    ])
    cfg.merge_from_list([x for kv in extra.items() for x in kv])
    return cfg


def make_batch(n=2, size=(80, 100)):
    images, targets = [], []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        h, w = size[0] + 8 * i, size[1] - 8 * i
        images.append(torch.rand(3, h, w, generator=g))
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:40, 12:50] = 1
        masks[1, 30:70, 40:90] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10, 50, 40], [40, 30, 90, 70]]),
                        "labels": torch.tensor([1, 3]), "masks": masks})
    return images, targets


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_train_forward_backward_finite_and_gradients_reach_trainable_params(kind):
    torch.manual_seed(0)
    model = Generalized_RCNN(small_cfg(kind, **{"RESNETS.FREEZE_AT": 2}))
    model.train()
    images, targets = make_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), (k, v)
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(".res1." in n or n.startswith("Conv_Body.") for n in frozen), "FREEZE_AT=2 froze nothing"
    assert not any(".res3." in n for n in frozen)


def test_training_step_leaves_frozen_parameters_untouched():
    torch.manual_seed(0)
    model = Generalized_RCNN(small_cfg("fpn", **{"RESNETS.FREEZE_AT": 2}))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = make_batch()
    for _ in range(2):
        opt.zero_grad()
        sum(model(images, targets).values()).backward()
        opt.step()
    after = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert frozen and not (frozen & changed)
    assert any(k.startswith("Box_Outs.") for k in changed) and any(k.startswith("Mask_Outs.") for k in changed)


def test_image_without_objects_trains_as_negative():
    model = Generalized_RCNN(small_cfg("fpn"))
    model.train()
    images, targets = make_batch(1)
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 80, 100, dtype=torch.uint8)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_bbox"].item() == 0.0 and losses["loss_bbox"].item() == 0.0


@pytest.mark.parametrize("kind", ["fpn", "c4"])
def test_eval_output_contract(kind):
    model = Generalized_RCNN(small_cfg(kind)).eval()
    images = [torch.rand(3, 70, 90), torch.rand(3, 50, 60)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for im, det in zip(images, out):
        n = det["boxes"].shape[0]
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape == (n, 4)
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1) + tuple(im.shape[-2:])
        if n:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
            assert (det["boxes"][:, 2] <= im.shape[-1]).all() and (det["boxes"][:, 3] <= im.shape[-2]).all()
            assert det["masks"].min() >= 0 and det["masks"].max() <= 1
            assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_missing_targets_and_bad_boxes_are_explained():
    model = Generalized_RCNN(small_cfg("fpn")).train()
    images, targets = make_batch(1)
    with pytest.raises(ValueError, match="targets"):
        model(images)
    bad = dict(targets[0])
    bad["boxes"] = torch.tensor([[10.0, 10, 5, 20], [1, 1, 2, 2]])
    with pytest.raises(ValueError, match="width/height"):
        model(images, [bad])
    bad["boxes"] = torch.tensor([[float("nan"), 10, 5, 20], [1, 1, 2, 2]])
    with pytest.raises(ValueError, match="NaN"):
        model(images, [bad])


class TinyBackbone(nn.Module):
    """A user backbone as in the torchvision tutorial: any module with `out_channels`."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(24, 24, 3, 2, 1), nn.ReLU(), nn.Conv2d(24, 32, 3, 2, 1))
        self.out_channels = 32

    def forward(self, x):
        return self.body(x)


def test_custom_backbone_with_out_channels_trains_and_infers():
    cfg = small_cfg("fpn", **{"FAST_RCNN.ROI_BOX_HEAD": "fast_rcnn_heads.roi_2mlp_head",
                              "MODEL.CONV_BODY": "ResNet.ResNet18_conv4_body",
                              "MRCNN.ROI_MASK_HEAD": "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs"})
    model = Generalized_RCNN(cfg, conv_body=TinyBackbone())
    assert model.spatial_scales == [1 / 16]
    model.train()
    images, targets = make_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2


# --- composition: ROIHeads inside, Detectron names and state-dict keys outside ----------------------------------------
def test_heads_keep_their_detectron_names_and_state_dict_keys():
    model = Generalized_RCNN(small_cfg("fpn"))
    assert [n for n, _ in model.named_children()] == ["preprocess", "Conv_Body", "RPN", "roi_heads"]
    for name in ("Box_Head", "Box_Outs", "Mask_Head", "Mask_Outs"):
        assert getattr(model, name) is getattr(model.roi_heads, name)
    keys = list(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"Conv_Body", "RPN", "Box_Head", "Box_Outs", "Mask_Head", "Mask_Outs"}
    assert "Box_Head.fc6.weight" in keys and "roi_heads.Box_Head.fc6.weight" in dict(model.named_parameters())
    # Parameters keep their order (an optimizer's saved state refers to positions).
    params = [n[len("roi_heads."):] if n.startswith("roi_heads.") else n for n, _ in model.named_parameters()]
    assert [k for k in keys if k in set(params)] == params

    other = Generalized_RCNN(small_cfg("fpn"))
    other.load_state_dict(model.state_dict(), strict=True)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    nested = {("roi_heads." + k if k.split(".")[0] in ("Box_Head", "Box_Outs", "Mask_Head", "Mask_Outs") else k): v
              for k, v in model.state_dict().items()}
    other.load_state_dict(nested, strict=True)
    broken = dict(model.state_dict())
    broken.pop("Box_Outs.cls_score.bias")
    broken["Mask_Outs.extra"] = torch.zeros(1)
    result = other.load_state_dict(broken, strict=False)
    assert result.missing_keys == ["Box_Outs.cls_score.bias"] and result.unexpected_keys == ["Mask_Outs.extra"]

    wrapper = nn.Module()
    wrapper.module = model  # DistributedDataParallel's layout
    assert "module.Box_Head.fc6.weight" in wrapper.state_dict()
    wrapper.load_state_dict(wrapper.state_dict(), strict=True)


def test_assigning_a_head_on_the_model_replaces_it_in_roi_heads():
    model = Generalized_RCNN(small_cfg("fpn"))
    new_outs = nn.Conv2d(32, 2, 1)
    model.Mask_Outs = new_outs
    assert model.roi_heads.Mask_Outs is new_outs and "Mask_Outs" not in model._modules
    assert model.state_dict()["Mask_Outs.weight"].shape == (2, 32, 1, 1)


def test_faster_rcnn_model_has_no_mask_attributes():
    model = Generalized_RCNN(small_cfg("fpn", **{"MODEL.MASK_ON": False}))
    assert not model.mask_on and not hasattr(model, "Mask_Head") and not hasattr(model, "Mask_Outs")
    assert hasattr(model, "Box_Head")
    with pytest.raises(ValueError, match="MASK_ON"):
        Generalized_RCNN(small_cfg("fpn", **{"MODEL.MASK_ON": False}), mask_head=nn.Identity())


def test_from_parts_builds_nothing_from_a_config():
    donor = Generalized_RCNN(small_cfg("fpn")).eval()
    model = Generalized_RCNN.from_parts(preprocess=donor.preprocess, conv_body=donor.Conv_Body, rpn=donor.RPN,
                                        roi_heads=donor.roi_heads).eval()
    assert model.roi_heads is donor.roi_heads and model.Conv_Body is donor.Conv_Body
    images = [torch.rand(3, 70, 90)]
    with torch.no_grad():
        for a, b in zip(model(images)[0].values(), donor(images)[0].values()):
            assert torch.equal(a, b)
    rpn_only = Generalized_RCNN.from_parts(preprocess=donor.preprocess, conv_body=donor.Conv_Body, rpn=donor.RPN,
                                           roi_heads=None).eval()
    assert rpn_only.rpn_only and not hasattr(rpn_only, "Box_Head")
    assert {k.split(".")[0] for k in rpn_only.state_dict()} == {"Conv_Body", "RPN"}
    with torch.no_grad():
        out = rpn_only(images)[0]
    assert out["boxes"].shape[0] == out["scores"].shape[0] > 0 and (out["labels"] == 1).all()
    with pytest.raises(ValueError, match="roi_heads"):
        Generalized_RCNN(small_cfg("fpn"), roi_heads=donor.roi_heads, box_outs=nn.Linear(2, 2))
