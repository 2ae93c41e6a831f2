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
