"""``Keypoint_Outs``: keypoint heatmap logits (Detectron's ``keypoint_rcnn_outputs``), the keypoint targets and loss,
and the decoding of heatmaps into keypoint coordinates.

:class:`KeypointRCNNOutputs`: ``kps_score_lowres``, a stride-2 deconvolution (kernel 4, padding 1) from the head's
``(R, dim, S, S)`` to ``(R, K, 2S, 2S)``, then bilinear upsampling by ``up_scale`` (``align_corners=False``) to the
``(R, K, H, H)`` heatmap logits, ``H = 2 * up_scale * S`` (``KRCNN.HEATMAP_SIZE``, 56). This is torchvision's
``KeypointRCNNPredictor``; Detectron upsamples with a fixed bilinear deconvolution, which differs from it only on
the border row/column.

Targets (:func:`keypoints_to_heatmap`, torchvision's): each ground-truth keypoint ``(x, y, v)`` of a RoI's matched
instance becomes the index ``y_bin * H + x_bin`` of the heatmap cell it falls in (``floor((x - x1) * H / w)``, a point
on the RoI's right/bottom edge in the last cell); it counts only if visible (``v > 0``) and inside the RoI.

Loss (:func:`keypoint_rcnn_loss`): softmax cross-entropy over the ``H * H`` cells of each valid keypoint's heatmap,
averaged over the valid keypoints (``KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS``, torchvision's ``keypointrcnn_loss``)
or summed and divided by a fixed ``normalizer`` (Detectron's ``IMS_PER_BATCH * BATCH_SIZE_PER_IM * FG_FRACTION *
NUM_KEYPOINTS``).

Decoding (:func:`heatmaps_to_keypoints`, torchvision's): each RoI's heatmaps are resized bicubically to the RoI's
``ceil(h) x ceil(w)`` pixels, the arg-max cell's centre is the keypoint and the resized logit there its score.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .keypoint_head import init_keypoint_conv

__all__ = ["KeypointRCNNOutputs", "keypoints_to_heatmap", "keypoint_rcnn_loss", "heatmaps_to_keypoints"]


class KeypointRCNNOutputs(nn.Module):
    """Keypoint heatmap logits.

    Args:
        dim_in: channels of the keypoint head output (``KRCNN.CONV_HEAD_DIM``).
        num_keypoints: ``K`` (``KRCNN.NUM_KEYPOINTS``).
        deconv_kernel: kernel of the stride-2 deconvolution (``KRCNN.DECONV_KERNEL``, 4; even, padding
            ``kernel // 2 - 1`` so that it doubles the side exactly).
        up_scale: bilinear factor after it (``KRCNN.UP_SCALE``, 2; 1 = none).
        conv_init: ``"MSRAFill"`` or ``"GaussianFill"``; bias 0.
        heatmap_size: the expected output side (``KRCNN.HEATMAP_SIZE``); a different one raises in ``forward``
            (None: not checked).

    ``forward(x (R, dim_in, S, S)) -> (R, K, 2 * up_scale * S, 2 * up_scale * S)`` float logits.
    """

    def __init__(self, dim_in: int, num_keypoints: int, deconv_kernel: int = 4, up_scale: int = 2,
                 conv_init: str = "MSRAFill", heatmap_size: Optional[int] = None):
        super().__init__()
        if dim_in < 1 or num_keypoints < 1 or up_scale < 1:
            raise ValueError(f"need dim_in, num_keypoints, up_scale >= 1; got {dim_in}, {num_keypoints}, {up_scale}")
        if deconv_kernel < 2 or deconv_kernel % 2:
            raise ValueError(f"KRCNN.DECONV_KERNEL = {deconv_kernel} must be even and >= 2 (stride-2 deconvolution "
                             "doubling the side)")
        self.num_keypoints = int(num_keypoints)
        self.up_scale = int(up_scale)
        self.heatmap_size = None if heatmap_size is None else int(heatmap_size)
        self.kps_score_lowres = nn.ConvTranspose2d(dim_in, num_keypoints, deconv_kernel, stride=2,
                                                   padding=deconv_kernel // 2 - 1)
        init_keypoint_conv(self.kps_score_lowres, conv_init)

    @classmethod
    def from_cfg(cls, cfg, dim_in: int) -> "KeypointRCNNOutputs":
        """Keys: ``KRCNN.{NUM_KEYPOINTS, DECONV_KERNEL, UP_SCALE, CONV_INIT, HEATMAP_SIZE}``."""
        k = cfg.KRCNN
        return cls(dim_in, k.NUM_KEYPOINTS, k.DECONV_KERNEL, k.UP_SCALE, k.CONV_INIT, heatmap_size=k.HEATMAP_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (R, {self.kps_score_lowres.in_channels}, S, S), got {tuple(x.shape)}")
        x = self.kps_score_lowres(x)
        if self.up_scale != 1:
            x = F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False,
                              recompute_scale_factor=False)
        if self.heatmap_size is not None and x.shape[-1] != self.heatmap_size:
            raise ValueError(f"the keypoint heatmaps are {x.shape[-1]} wide, not KRCNN.HEATMAP_SIZE = "
                             f"{self.heatmap_size}: set it to 2 * KRCNN.UP_SCALE * KRCNN.ROI_XFORM_RESOLUTION")
        return x


def keypoints_to_heatmap(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> Tuple[Tensor, Tensor]:
    """Heatmap targets of ``keypoints`` in ``rois``.

    Args:
        keypoints: ``(R, K, 3)`` float ``(x, y, visibility)`` in the rois' pixels (the matched instance of each RoI).
        rois: ``(R, 4)`` float ``x1, y1, x2, y2``.
        heatmap_size: ``H``.

    Returns:
        ``(targets, valid)``, both ``(R, K)`` int64: the cell index ``y * H + x`` (0 where invalid) and 1 for a
        visible keypoint inside its RoI, else 0.
    """
    if keypoints.dim() != 3 or keypoints.shape[-1] != 3 or rois.shape != (keypoints.shape[0], 4):
        raise ValueError(f"keypoints must be (R, K, 3) and rois (R, 4); got {tuple(keypoints.shape)} and "
                         f"{tuple(rois.shape)}")
    offset_x, offset_y = rois[:, 0:1], rois[:, 1:2]
    scale_x = heatmap_size / (rois[:, 2:3] - rois[:, 0:1])
    scale_y = heatmap_size / (rois[:, 3:4] - rois[:, 1:2])
    x, y = keypoints[..., 0], keypoints[..., 1]
    # A keypoint exactly on the right/bottom edge would fall one cell out: torchvision puts it in the last cell.
    x_boundary = x == rois[:, 2:3]
    y_boundary = y == rois[:, 3:4]
    x = ((x - offset_x) * scale_x).floor().long()
    y = ((y - offset_y) * scale_y).floor().long()
    x[x_boundary] = heatmap_size - 1
    y[y_boundary] = heatmap_size - 1
    valid = (x >= 0) & (y >= 0) & (x < heatmap_size) & (y < heatmap_size) & (keypoints[..., 2] > 0)
    valid = valid.long()
    return (y * heatmap_size + x) * valid, valid


def keypoint_rcnn_loss(keypoint_logits: Tensor, rois: Union[Tensor, Sequence[Tensor]],
                       gt_keypoints: Union[Tensor, Sequence[Tensor]], normalizer: Optional[float] = None) -> Tensor:
    """Keypoint loss of the foreground RoIs.

    Args:
        keypoint_logits: ``(R, K, H, H)``.
        rois: ``(R, 4)`` (or per-image list) boxes the logits were computed on.
        gt_keypoints: ``(R, K, 3)`` (or per-image list) keypoints of each RoI's matched instance, same pixels.
        normalizer: None averages over the valid keypoints (torchvision); a number divides the sum by it
            (Detectron without ``NORMALIZE_BY_VISIBLE_KEYPOINTS``).

    Returns:
        0-d loss; ``0 * keypoint_logits.sum()`` when no keypoint is valid (the graph stays connected).
    """
    rois = rois if isinstance(rois, Tensor) else torch.cat(list(rois))
    gt_keypoints = gt_keypoints if isinstance(gt_keypoints, Tensor) else torch.cat(list(gt_keypoints))
    if keypoint_logits.dim() != 4 or keypoint_logits.shape[2] != keypoint_logits.shape[3]:
        raise ValueError(f"keypoint_logits must be (R, K, H, H), got {tuple(keypoint_logits.shape)}")
    n, k, h, w = keypoint_logits.shape
    if gt_keypoints.shape != (n, k, 3):
        raise ValueError(f"gt_keypoints must be ({n}, {k}, 3) to match keypoint_logits, got {tuple(gt_keypoints.shape)}")
    targets, valid = keypoints_to_heatmap(gt_keypoints, rois, h)
    valid = torch.nonzero(valid.flatten()).squeeze(1)
    if valid.numel() == 0:
        return keypoint_logits.sum() * 0
    logits = keypoint_logits.reshape(n * k, h * w)[valid].float()
    targets = targets.flatten()[valid]
    if normalizer is None:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / float(normalizer)


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> Tuple[Tensor, Tensor]:
    """Keypoints from heatmap logits.

    Args:
        maps: ``(R, K, H, H)`` logits.
        rois: ``(R, 4)`` boxes ``x1, y1, x2, y2`` they were computed on.

    Returns:
        ``(keypoints (R, K, 3) float32 (x, y, 1) in the rois' pixels, scores (R, K) float32)``: the scores are the
        bicubically resized logits at the chosen cell (not probabilities), as torchvision.
    """
    if maps.dim() != 4 or rois.shape != (maps.shape[0], 4):
        raise ValueError(f"maps must be (R, K, H, W) and rois (R, 4); got {tuple(maps.shape)} and {tuple(rois.shape)}")
    maps = maps.float()
    num_rois, k = maps.shape[:2]
    offset_x, offset_y = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    xy = torch.zeros((num_rois, k, 3), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((num_rois, k), dtype=torch.float32, device=maps.device)
    ar = torch.arange(k, device=maps.device)
    # One resize per RoI: each has its own size (the heatmaps are resized to the box's pixels before the arg-max).
    for i in range(num_rois):
        w_i, h_i = int(widths_ceil[i].item()), int(heights_ceil[i].item())
        roi_map = F.interpolate(maps[i][:, None], size=(h_i, w_i), mode="bicubic", align_corners=False)[:, 0]
        pos = roi_map.reshape(k, -1).argmax(dim=1)
        x_int = pos % w_i
        y_int = torch.div(pos - x_int, w_i, rounding_mode="floor")
        xy[i, :, 0] = (x_int.float() + 0.5) * (widths[i] / w_i) + offset_x[i]
        xy[i, :, 1] = (y_int.float() + 0.5) * (heights[i] / h_i) + offset_y[i]
        xy[i, :, 2] = 1
        scores[i] = roi_map[ar, y_int, x_int]
    return xy, scores
