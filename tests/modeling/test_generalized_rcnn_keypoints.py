"""A small Keypoint R-CNN (FPN ResNet-18) end to end: keypoint targets are resized with the image and learnt
(loss_keypoint with gradients into the keypoint pair), crowd instances drop their keypoints, and inference returns
keypoints in input-image pixels."""
import torch

from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from tests.modeling.test_generalized_rcnn import small_cfg


def _cfg():
    return small_cfg("fpn", **{"MODEL.MASK_ON": False, "MODEL.KEYPOINTS_ON": True, "KRCNN.NUM_KEYPOINTS": 4,
                               "KRCNN.NUM_STACKED_CONVS": 2, "KRCNN.CONV_HEAD_DIM": 16,
                               "KRCNN.ROI_XFORM_RESOLUTION": 7, "KRCNN.HEATMAP_SIZE": 28})


def _batch():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 80, 100, generator=g), torch.rand(3, 90, 70, generator=g)]
    targets = []
    for im in images:
        h, w = im.shape[-2:]
        boxes = torch.tensor([[10.0, 10.0, w * 0.6, h * 0.7], [w * 0.5, h * 0.4, w - 2.0, h - 3.0]])
        kps = torch.zeros(2, 4, 3)
        for i, b in enumerate(boxes):
            kps[i, :, 0] = torch.linspace(float(b[0]) + 2, float(b[2]) - 2, 4)
            kps[i, :, 1] = torch.linspace(float(b[1]) + 2, float(b[3]) - 2, 4)
            kps[i, :, 2] = torch.tensor([2.0, 1.0, 2.0, 0.0])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "keypoints": kps,
                        "iscrowd": torch.tensor([0, 1])})
    return images, targets


def test_keypoint_rcnn_trains_and_predicts():
    torch.manual_seed(0)
    model = Generalized_RCNN(_cfg())
    assert model.keypoints_on and not model.mask_on
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert "loss_keypoint" in losses and "loss_mask" not in losses
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"].item() > 0
    sum(losses.values()).backward()
    assert model.Keypoint_Head.conv_fcn1.weight.grad.abs().sum() > 0
    assert model.Keypoint_Outs.kps_score_lowres.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, im in zip(out, images):
        n = o["boxes"].shape[0]
        assert n > 0 and o["keypoints"].shape == (n, 4, 3) and o["keypoints_scores"].shape == (n, 4)
        # in input-image pixels, inside their boxes (a box narrower than 1 px counts as 1 px wide, as torchvision)
        x1, x2 = o["boxes"][:, None, 0], torch.maximum(o["boxes"][:, None, 2], o["boxes"][:, None, 0] + 1)
        assert (o["keypoints"][..., 0] >= x1 - 1e-3).all() and (o["keypoints"][..., 0] <= x2 + 1e-3).all()
        y1, y2 = o["boxes"][:, None, 1], torch.maximum(o["boxes"][:, None, 3], o["boxes"][:, None, 1] + 1)
        assert (o["keypoints"][..., 1] >= y1 - 1e-3).all() and (o["keypoints"][..., 1] <= y2 + 1e-3).all()
        assert (o["boxes"][:, 3] <= im.shape[-2]).all()


def test_keypoint_rcnn_needs_keypoints_in_targets():
    model = Generalized_RCNN(_cfg()).train()
    images, targets = _batch()
    for t in targets:
        del t["keypoints"]
    try:
        model(images, targets)
    except ValueError as e:
        assert "keypoints" in str(e)
    else:
        raise AssertionError("a keypoint model trained without target keypoints")
