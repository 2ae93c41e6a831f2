"""Keypoint_Head / Keypoint_Outs, keypoint targets, loss and decoding, against hand-computed values and torchvision's
keypoint R-CNN functions; and the keypoint branch inside ROIHeads."""
import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

from maskrcnn.config import get_cfg
from maskrcnn.modeling.roi_heads import (KeypointRCNNConvHead, KeypointRCNNOutputs, ROIHeads, build_keypoint_head,
                                         heatmaps_to_keypoints, keypoint_rcnn_loss, keypoints_to_heatmap)


def test_targets_hand_computed():
    rois = torch.tensor([[10.0, 20.0, 50.0, 60.0]])  # 40 x 40 px, heatmap 8: 5 px per cell
    kps = torch.tensor([[[10.0, 20.0, 2], [34.9, 45.0, 1], [50.0, 60.0, 2], [30.0, 30.0, 0], [51.0, 30.0, 2],
                         [9.0, 30.0, 1]]])
    targets, valid = keypoints_to_heatmap(kps, rois, 8)
    # (0, 0) -> 0; (4.98 -> 4, 5 -> 5) -> 5 * 8 + 4; on the right/bottom edge -> last cell 63; invisible; outside x2;
    # left of x1.
    assert targets.tolist() == [[0, 44, 63, 0, 0, 0]]
    assert valid.tolist() == [[1, 1, 1, 0, 0, 0]]


def _random_case(seed=0, r=7, k=5, h=12):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=g) * 50
    rois = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 40 + 3], 1)
    # mostly inside the RoI, some up to 10% outside
    wh = (rois[:, 2:] - rois[:, :2])[:, None]
    kps = torch.rand(r, k, 3, generator=g)
    kps[..., :2] = rois[:, None, :2] + kps[..., :2] * wh * 1.2 - wh * 0.1
    kps[..., 2] = (torch.rand(r, k, generator=g) > 0.3).float() * 2
    logits = torch.randn(r, k, h, h, generator=g)
    return rois, kps, logits


def test_targets_equal_torchvision():
    rois, kps, _ = _random_case()
    kps[:2, 0, :2] = rois[:2, 2:]  # exactly on the far corner
    ours = keypoints_to_heatmap(kps, rois, 12)
    ref = tv_roi_heads.keypoints_to_heatmap(kps, rois, 12)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert ours[1].sum() > 3  # the case exercises valid keypoints


def test_loss_equal_torchvision():
    rois, kps, logits = _random_case(1)
    split = [3, 4]
    ref = tv_roi_heads.keypointrcnn_loss(logits, list(rois.split(split)), list(kps.split(split)),
                                         [torch.arange(3), torch.arange(4)])
    torch.testing.assert_close(keypoint_rcnn_loss(logits, list(rois.split(split)), list(kps.split(split))), ref)
    # Detectron's fixed normaliser: the sum over valid keypoints divided by it.
    _, valid = keypoints_to_heatmap(kps, rois, 12)
    torch.testing.assert_close(keypoint_rcnn_loss(logits, rois, kps, normalizer=100.0),
                               ref * valid.sum() / 100.0)


def test_loss_no_valid_keypoint_is_zero_and_connected():
    rois, kps, logits = _random_case(2)
    kps[..., 2] = 0
    logits.requires_grad_(True)
    loss = keypoint_rcnn_loss(logits, rois, kps)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_decoding_equal_torchvision():
    rois, _, logits = _random_case(3, h=56)
    rois[0, 2:] = rois[0, :2] + 0.5  # smaller than a pixel: clamped to 1
    kps, scores = heatmaps_to_keypoints(logits, rois)
    ref_kps, ref_scores = tv_roi_heads.heatmaps_to_keypoints(logits, rois)
    assert kps.shape == (7, 5, 3) and scores.shape == (7, 5)
    torch.testing.assert_close(kps, ref_kps)
    torch.testing.assert_close(scores, ref_scores)


def test_decoding_hand_computed():
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, 1, 2] = 5.0  # cell x=2, y=1
    kps, scores = heatmaps_to_keypoints(logits, torch.tensor([[100.0, 200.0, 104.0, 204.0]]))  # 1 px per cell
    assert kps[0, 0].tolist() == [102.5, 201.5, 1.0]
    assert scores[0, 0].item() == 5.0


def test_head_and_outputs_equal_torchvision_modules():
    torch.manual_seed(0)
    feat = [torch.randn(1, 8, 32, 32)]
    rois = [torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 31.0, 31.0]])]
    head = KeypointRCNNConvHead(8, [1.0], resolution=6, sampling_ratio=2, num_convs=3, dim=16)
    outs = KeypointRCNNOutputs(16, 5)
    tv_head, tv_pred = KeypointRCNNHeads(8, [16, 16, 16]), KeypointRCNNPredictor(16, 5)
    for i in range(3):
        tv_head[2 * i].load_state_dict(getattr(head, f"conv_fcn{i + 1}").state_dict())
    tv_pred.load_state_dict(outs.state_dict())
    pooled = torch.ops.torchvision.roi_align(feat[0], torch.cat([torch.zeros(2, 1), rois[0]], 1), 1.0, 6, 6, 2,
                                             False)
    logits = outs(head(feat, rois))
    assert logits.shape == (2, 5, 24, 24)
    torch.testing.assert_close(logits, tv_pred(tv_head(pooled)))


def test_from_cfg_and_registry():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.KEYPOINTS_ON", True, "KRCNN.NUM_STACKED_CONVS", 2, "KRCNN.CONV_HEAD_DIM", 32,
                         "KRCNN.NUM_KEYPOINTS", 4])
    head = build_keypoint_head(cfg, 64, [1.0 / 16])
    assert head.num_convs == 2 and head.out_channels == 32
    assert KeypointRCNNOutputs.from_cfg(cfg, 32).kps_score_lowres.out_channels == 4
    cfg.merge_from_list(["KRCNN.ROI_KEYPOINTS_HEAD", "keypoint_rcnn_heads.nope"])
    with pytest.raises(ValueError, match="KRCNN.ROI_KEYPOINTS_HEAD"):
        build_keypoint_head(cfg, 64, [1.0 / 16])


def _roi_heads(normalize_by_visible=True):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.MASK_ON", False, "MODEL.KEYPOINTS_ON", True, "MODEL.NUM_CLASSES", 2,
                         "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "FAST_RCNN.MLP_HEAD_DIM", 16,
                         "KRCNN.NUM_STACKED_CONVS", 2, "KRCNN.CONV_HEAD_DIM", 8, "KRCNN.NUM_KEYPOINTS", 3,
                         "KRCNN.ROI_XFORM_RESOLUTION", 4, "KRCNN.HEATMAP_SIZE", 16,
                         "KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS", normalize_by_visible, "TRAIN.BATCH_SIZE_PER_IM", 16])
    torch.manual_seed(0)
    return ROIHeads.from_cfg(cfg, 4, [1.0 / 4])


def test_roi_heads_keypoint_branch():
    heads = _roi_heads()
    assert heads.keypoints_on and not heads.mask_on
    feats = [torch.randn(1, 4, 16, 16)]
    gt = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1]),
          "keypoints": torch.tensor([[[10.0, 10.0, 2], [30.0, 40.0, 1], [0.0, 0.0, 0]]])}
    proposals = [torch.tensor([[6.0, 6.0, 42.0, 50.0], [0.0, 0.0, 20.0, 20.0]])]
    heads.train()
    _, losses = heads(feats, proposals, [(64, 64)], [gt])
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_keypoint"}
    assert losses["loss_keypoint"].item() > 0
    losses["loss_keypoint"].backward()
    assert heads.Keypoint_Outs.kps_score_lowres.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="keypoints"):
        heads(feats, proposals, [(64, 64)], [{k: v for k, v in gt.items() if k != "keypoints"}])
    heads.eval()
    heads.score_thresh = 0.0
    with torch.no_grad():
        results, _ = heads(feats, proposals, [(64, 64)])
        kps, scores = heads.keypoints(feats, [results[0]["boxes"]])
    r = results[0]
    assert r["keypoints"].shape == (r["boxes"].shape[0], 3, 3) and r["keypoints_scores"].shape == (r["boxes"].shape[0], 3)
    assert torch.equal(kps[0], r["keypoints"]) and torch.equal(scores[0], r["keypoints_scores"])
    # every keypoint lies in its box
    b = r["boxes"][:, None]
    assert ((r["keypoints"][..., 0] >= b[..., 0]) & (r["keypoints"][..., 0] <= b[..., 2])).all()


def test_roi_heads_detectron_normaliser():
    heads = _roi_heads(normalize_by_visible=False)
    # TRAIN.IMS_PER_BATCH 2 * BATCH_SIZE_PER_IM 16 * FG_FRACTION 0.25 * 3 keypoints
    assert heads.keypoint_loss_normalizer == 2 * 16 * 0.25 * 3
    assert _roi_heads().keypoint_loss_normalizer is None


def test_pairs_required():
    head = KeypointRCNNConvHead(4, [1.0], num_convs=1, dim=4)
    with pytest.raises(ValueError, match="go together"):
        ROIHeads(torch.nn.Identity(), torch.nn.Identity(), keypoint_head=head)
