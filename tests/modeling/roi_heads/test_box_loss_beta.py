"""FAST_RCNN.SMOOTH_L1_BETA: Detectron's Fast R-CNN box loss is smooth L1 with beta 1.0 (Caffe2's SmoothL1Loss
default, fast_rcnn_heads.add_fast_rcnn_losses), torchvision's with beta 1/9 (roi_heads.fastrcnn_loss); both divide by
the number of sampled RoIs. Each recipe family sets its own, and the model passes the key to the loss."""

import pytest
import torch

from maskrcnn.config import get_cfg
from maskrcnn.modeling.generalized_rcnn import Generalized_RCNN
from maskrcnn.modeling.roi_heads.box_outputs import fast_rcnn_losses



@pytest.mark.parametrize("beta, expected", [
    # One foreground RoI of class 1 among 4 sampled; its deltas (0.5, -0.05, 0, 2) against zero targets.
    (1.0, (0.5 * 0.25 + 0.5 * 0.0025 + 0.0 + (2.0 - 0.5)) / 4),
    (1.0 / 9, ((0.5 - 0.5 / 9) + 0.5 * 0.0025 * 9 + 0.0 + (2.0 - 0.5 / 9)) / 4),
])
def test_hand_computed_box_loss(beta, expected):
    cls_score = torch.zeros(4, 3)
    bbox_pred = torch.zeros(4, 12)
    bbox_pred[0, 4:8] = torch.tensor([0.5, -0.05, 0.0, 2.0])
    labels = torch.tensor([1, 0, 0, 0])
    _, loss_bbox = fast_rcnn_losses(cls_score, bbox_pred, labels, torch.zeros(4, 4), beta=beta)
    assert loss_bbox.item() == pytest.approx(expected, rel=1e-6)


def _tiny_losses(beta):
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.CONV_BODY", "FPN.fpn_ResNet18_conv5_body", "FPN.DIM", 16, "MODEL.MASK_ON", False,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.ROI_XFORM_RESOLUTION", 7,
        "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 2, "FAST_RCNN.MLP_HEAD_DIM", 32, "MODEL.NUM_CLASSES", 3,
        "TRAIN.SCALES", "(64,)", "TRAIN.MAX_SIZE", 96, "TRAIN.RPN_PRE_NMS_TOP_N", 200,
        "TRAIN.RPN_POST_NMS_TOP_N", 50, "TRAIN.BATCH_SIZE_PER_IM", 32, "FAST_RCNN.SMOOTH_L1_BETA", beta,
    ])
    torch.manual_seed(0)
    model = Generalized_RCNN(cfg).train()
    with torch.no_grad():  # large deltas, so that most lie between the two betas
        model.Box_Outs.bbox_pred.weight.normal_(0, 0.5)
    image = [torch.rand(3, 60, 80, generator=torch.Generator().manual_seed(1))]
    target = [{"boxes": torch.tensor([[10.0, 8, 50, 40]]), "labels": torch.tensor([2])}]
    torch.manual_seed(1)
    return {k: v.item() for k, v in model(image, target).items()}


def test_the_model_passes_the_key_to_the_box_loss():
    detectron, torchvision = _tiny_losses(1.0), _tiny_losses(1.0 / 9)
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls"):
        assert detectron[key] == torchvision[key], key  # same weights, same samples
    assert detectron["loss_bbox"] != pytest.approx(torchvision["loss_bbox"], rel=1e-3)
