"""``Box_Head``: RoI features for Fast R-CNN.

- :class:`Roi2MLPHead` (Detectron's ``fast_rcnn_heads.roi_2mlp_head``, torchvision's ``TwoMLPHead``): RoIAlign
  (multi-level on FPN) to ``C x 7 x 7``, then ``fc6`` and ``fc7`` with ReLU -> ``(R, 1024)``.
- :class:`ResNetRoIConv5Head` (Detectron's ``ResNet.ResNet_roi_conv5_head``, the C4 head): RoIAlign on res4 to
  ``1024 x 14 x 14``, the ``res5`` stage (stride 2) -> ``2048 x 7 x 7``, average pool -> ``(R, 2048)``. It can also
  return the res5 map, which the ``v0upshare`` mask head consumes.
- :class:`RoiXconv1fcHead` (Detectron's ``fast_rcnn_heads.roi_Xconv1fc_head`` and, with ``use_gn``,
  ``roi_Xconv1fc_gn_head`` of its GroupNorm configs): RoIAlign to ``C x 7 x 7``, ``num_convs`` 3x3 convs
  ``head_conv1..N`` (+ GroupNorm ``head_conv{i}_gn``, then no conv bias) with ReLU, then ``fc6`` with ReLU ->
  ``(R, mlp_dim)``.

Both take ``forward(blob_conv, rois)`` where ``blob_conv`` is the body's output (a Tensor, or a list finest first)
and ``rois`` is an ``(R, 5)`` tensor ``[batch_idx, x1, y1, x2, y2]``, a list of per-image ``(R_i, 4)`` boxes, or
Detectron's ``rpn_ret`` dict with key ``"rois"`` (numpy arrays accepted). Boxes are in input-image pixels.

The helpers (:func:`make_roi_xform`, :func:`as_rois`, :func:`fpn_feature_indices`, :func:`roi_transform`) are
shared with the mask heads.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..activation import relu_after, relu_stack, run_fused_stack
from ...ops.boxes import boxes_to_rois
from ...ops.poolers import MultiLevelRoIAlign
from ...ops.roi_align import RoIAlign
from ...ops.roi_pool import RoIPool
from ..backbone.norms import group_norm
from ..backbone.resnet import RESNET_BLOCKS_PER_STAGE, make_stage

__all__ = [
    "Roi2MLPHead", "ResNetRoIConv5Head", "RoiXconv1fcHead", "BOX_HEAD_REGISTRY", "build_box_head",
    "make_roi_xform", "as_rois", "fpn_feature_indices", "roi_feature_indices", "roi_transform", "xavier_fill",
]

BlobConv = Union[Tensor, Sequence[Tensor]]
RoIsLike = Union[Tensor, np.ndarray, Sequence[Tensor], Dict[str, object]]

ROI_XFORM_METHODS = ("RoIAlign", "RoIPoolF")


# --- shared RoI feature plumbing -------------------------------------------------------------------------------------
def make_roi_xform(method: str, resolution: int, scales: Sequence[float], sampling_ratio: int, aligned: bool = False,
                   canonical_scale: int = 224, canonical_level: int = 4) -> nn.Module:
    """The RoI feature transform: :class:`MultiLevelRoIAlign` over ``scales`` (finest first) when there are several
    levels, else a single-level :class:`RoIAlign` or :class:`RoIPool` (``method`` ``"RoIAlign"`` / ``"RoIPoolF"``)."""
    if method not in ROI_XFORM_METHODS:
        raise ValueError(f"roi_xform={method!r} is not supported; use one of {ROI_XFORM_METHODS}")
    scales = [float(s) for s in scales]
    if not scales or any(not (s > 0) for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive feature scales, got {scales!r}")
    if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    resolution = int(resolution)
    if len(scales) > 1:
        if method != "RoIAlign":
            raise ValueError(f"roi_xform={method!r} supports a single feature level only, got scales={scales}")
        return MultiLevelRoIAlign((resolution, resolution), scales, int(sampling_ratio), aligned=bool(aligned),
                                  canonical_scale=canonical_scale, canonical_level=canonical_level)
    if method == "RoIPoolF":
        return RoIPool((resolution, resolution), scales[0])
    return RoIAlign((resolution, resolution), scales[0], int(sampling_ratio), aligned=bool(aligned))


def as_rois(rois: RoIsLike, device: Optional[torch.device] = None) -> Tensor:
    """``(R, 5)`` float RoIs from any accepted form (see the module docstring), on ``device``."""
    if isinstance(rois, dict):
        if "rois" not in rois:
            raise ValueError(f"rois dict (Detectron's rpn_ret) has no 'rois' key; keys: {sorted(rois)}")
        rois = rois["rois"]
    if isinstance(rois, np.ndarray):
        rois = torch.from_numpy(np.ascontiguousarray(rois, dtype=np.float32))
    if isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois must be (R, 5) [batch_idx, x1, y1, x2, y2], got shape {tuple(rois.shape)}")
        if not rois.is_floating_point():
            rois = rois.float()
    elif isinstance(rois, (list, tuple)):
        boxes = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) if isinstance(b, np.ndarray) else b
                 for b in rois]
        rois = boxes_to_rois(boxes)
    else:
        raise TypeError(f"rois must be an (R, 5) tensor, a list of (Ri, 4) tensors or a dict with 'rois', "
                        f"got {type(rois).__name__}")
    return rois if device is None else rois.to(device)


def fpn_feature_indices(spatial_scales: Sequence[float], min_level: int, max_level: int) -> List[int]:
    """Indices of the feature maps whose level ``-log2(scale)`` lies in ``[min_level, max_level]`` (FPN RoI levels);
    ``[0]`` for a single-level body."""
    if len(spatial_scales) == 1:
        return [0]
    levels = [int(round(-math.log2(float(s)))) for s in spatial_scales]
    idx = [i for i, lvl in enumerate(levels) if min_level <= lvl <= max_level]
    if not idx:
        raise ValueError(f"no feature map has a level in [{min_level}, {max_level}]; levels are {levels}")
    return idx


def roi_feature_indices(cfg, spatial_scales: Sequence[float]) -> List[int]:
    """The maps the RoI heads pool from: the FPN levels ``FPN.ROI_MIN_LEVEL..ROI_MAX_LEVEL``, or with
    ``FPN.MULTILEVEL_ROIS = False`` only the finest, ``ROI_MIN_LEVEL`` (P2), for every RoI (Detectron's P2-only FPN
    bodies); ``[0]`` for a single-level body."""
    max_level = cfg.FPN.ROI_MAX_LEVEL if cfg.FPN.MULTILEVEL_ROIS else cfg.FPN.ROI_MIN_LEVEL
    return fpn_feature_indices(spatial_scales, cfg.FPN.ROI_MIN_LEVEL, max_level)


def roi_transform(roi_xform: nn.Module, blob_conv: BlobConv, rois: RoIsLike, num_levels: int,
                  feature_indices: Optional[Sequence[int]] = None) -> Tensor:
    """Pool ``rois`` from ``blob_conv`` -> ``(R, C, oh, ow)``. ``feature_indices`` pick the pooled maps from a list
    (default: its first ``num_levels``, i.e. the finest)."""
    feats = [blob_conv] if isinstance(blob_conv, Tensor) else list(blob_conv)
    if feature_indices is not None:
        if max(feature_indices) >= len(feats):
            raise ValueError(f"blob_conv has {len(feats)} feature maps but feature_indices={list(feature_indices)}")
        feats = [feats[i] for i in feature_indices]
    elif len(feats) < num_levels:
        raise ValueError(f"blob_conv has {len(feats)} feature maps, the RoI transform needs {num_levels}")
    else:
        feats = feats[:num_levels]
    roi_tensor = as_rois(rois, feats[0].device)
    if isinstance(roi_xform, MultiLevelRoIAlign):
        return roi_xform(feats, roi_tensor)
    return roi_xform(feats[0], roi_tensor)


def xavier_fill(weight: Tensor) -> None:
    """Caffe2's XavierFill (Detectron's fc init): uniform in ``+-sqrt(3 / fan_in)``."""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)


# --- heads -----------------------------------------------------------------------------------------------------------
class Roi2MLPHead(nn.Module):
    """RoI transform + two fully connected layers (FPN box head).

    Args:
        in_channels: channels of the pooled feature maps.
        scales: spatial scales of the pooled levels, finest first (e.g. ``[1/4, 1/8, 1/16, 1/32]`` for P2..P5);
            one scale means single-level pooling.
        resolution: side of the RoI transform output.
        sampling_ratio: RoIAlign samples per bin side (``<= 0`` adaptive).
        mlp_dim: width of ``fc6`` and ``fc7`` (``out_channels``).
        aligned: RoIAlign with the half-pixel offset.
        canonical_scale, canonical_level: FPN level assignment (Detectron's ``ROI_CANONICAL_*``).
        roi_xform: ``"RoIAlign"`` or ``"RoIPoolF"`` (single level only).
        feature_indices: which maps of a ``blob_conv`` list are pooled (default: the first ``len(scales)``).

    ``forward(blob_conv, rois) -> (R, mlp_dim)``. Weights: XavierFill, biases 0 (Detectron).
    """

    def __init__(self, in_channels: int, scales: Sequence[float], resolution: int = 7, sampling_ratio: int = 2,
                 mlp_dim: int = 1024, aligned: bool = False, canonical_scale: int = 224, canonical_level: int = 4,
                 roi_xform: str = "RoIAlign", feature_indices: Optional[Sequence[int]] = None):
        super().__init__()
        if in_channels < 1 or mlp_dim < 1:
            raise ValueError(f"in_channels={in_channels} and mlp_dim={mlp_dim} must be positive")
        self.roi_xform = make_roi_xform(roi_xform, resolution, scales, sampling_ratio, aligned, canonical_scale,
                                        canonical_level)
        self.num_levels = len(scales)
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        if self.feature_indices is not None and len(self.feature_indices) != self.num_levels:
            raise ValueError(f"feature_indices={self.feature_indices} must name {self.num_levels} maps (one per scale)")
        self.resolution = int(resolution)
        self.fc6 = nn.Linear(in_channels * self.resolution ** 2, mlp_dim)
        self.fc7 = nn.Linear(mlp_dim, mlp_dim)
        self.out_channels = int(mlp_dim)
        for fc in (self.fc6, self.fc7):
            xavier_fill(fc.weight)
            nn.init.zeros_(fc.bias)
        self.fused_stack: Optional[nn.Module] = None

    def feature_stack(self) -> nn.Sequential:
        """What ``forward`` runs on the pooled maps, as one ``nn.Sequential`` (``relu_stack``): flatten, ``fc6``,
        ReLU, ``fc7``, ReLU."""
        return relu_stack([self.fc6, self.fc7], flatten=True)

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float]) -> "Roi2MLPHead":
        """Keys: ``FAST_RCNN.{ROI_XFORM_METHOD, ROI_XFORM_RESOLUTION, ROI_XFORM_SAMPLING_RATIO, ROI_XFORM_ALIGNED,
        MLP_HEAD_DIM}``, ``FPN.{MULTILEVEL_ROIS, ROI_MIN_LEVEL, ROI_MAX_LEVEL, ROI_CANONICAL_SCALE,
        ROI_CANONICAL_LEVEL}`` (see :func:`roi_feature_indices`)."""
        idx = roi_feature_indices(cfg, spatial_scales)
        fr = cfg.FAST_RCNN
        return cls(in_channels, [spatial_scales[i] for i in idx], resolution=fr.ROI_XFORM_RESOLUTION,
                   sampling_ratio=fr.ROI_XFORM_SAMPLING_RATIO, mlp_dim=fr.MLP_HEAD_DIM, aligned=fr.ROI_XFORM_ALIGNED,
                   canonical_scale=cfg.FPN.ROI_CANONICAL_SCALE, canonical_level=cfg.FPN.ROI_CANONICAL_LEVEL,
                   roi_xform=fr.ROI_XFORM_METHOD, feature_indices=idx)

    def forward(self, blob_conv: BlobConv, rois: RoIsLike) -> Tensor:
        x = roi_transform(self.roi_xform, blob_conv, rois, self.num_levels, self.feature_indices)
        fused = run_fused_stack(self, x)
        if fused is not None:
            return fused
        x = x.flatten(start_dim=1)
        x = relu_after(self.fc6(x), x)
        return relu_after(self.fc7(x), x)


class RoiXconv1fcHead(nn.Module):
    """RoI transform + ``num_convs`` 3x3 convolutions + one fully connected layer (Detectron's GN box head).

    Args:
        in_channels, scales, resolution, sampling_ratio, aligned, canonical_scale, canonical_level, roi_xform,
            feature_indices: as :class:`Roi2MLPHead`.
        num_convs: stacked 3x3 convolutions (Detectron's ``FAST_RCNN.NUM_STACKED_CONVS``, 4).
        conv_dim: their channels (``FAST_RCNN.CONV_HEAD_DIM``, 256).
        mlp_dim: width of ``fc6`` (``out_channels``).
        use_gn: GroupNorm (32 groups) after every conv, which then has no bias (Detectron's ``ConvGN``).

    Modules: ``head_conv{i}`` (+ ``head_conv{i}_gn``), ``fc6`` — Detectron's blob names ``head_conv{i}_w``,
    ``head_conv{i}_gn_{s,b}``, ``fc6_{w,b}``. ``forward(blob_conv, rois) -> (R, mlp_dim)``. Init: MSRAFill convs,
    XavierFill ``fc6``, zero biases (Detectron).
    """

    def __init__(self, in_channels: int, scales: Sequence[float], resolution: int = 7, sampling_ratio: int = 2,
                 num_convs: int = 4, conv_dim: int = 256, mlp_dim: int = 1024, use_gn: bool = False,
                 aligned: bool = False, canonical_scale: int = 224, canonical_level: int = 4,
                 roi_xform: str = "RoIAlign", feature_indices: Optional[Sequence[int]] = None):
        super().__init__()
        if in_channels < 1 or conv_dim < 1 or mlp_dim < 1 or num_convs < 0:
            raise ValueError(f"need in_channels, conv_dim, mlp_dim >= 1 and num_convs >= 0; got in_channels="
                             f"{in_channels}, conv_dim={conv_dim}, mlp_dim={mlp_dim}, num_convs={num_convs}")
        self.roi_xform = make_roi_xform(roi_xform, resolution, scales, sampling_ratio, aligned, canonical_scale,
                                        canonical_level)
        self.num_levels = len(scales)
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        self.resolution = int(resolution)
        self.num_convs = int(num_convs)
        self.use_gn = bool(use_gn)
        channels = int(in_channels)
        for i in range(1, self.num_convs + 1):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1, bias=not self.use_gn)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            self.add_module(f"head_conv{i}", conv)
            if self.use_gn:
                self.add_module(f"head_conv{i}_gn", group_norm(conv_dim))
            channels = conv_dim
        self.fc6 = nn.Linear(channels * self.resolution ** 2, mlp_dim)
        xavier_fill(self.fc6.weight)
        nn.init.zeros_(self.fc6.bias)
        self.out_channels = int(mlp_dim)

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float], use_gn: bool = False
                 ) -> "RoiXconv1fcHead":
        """Keys: those of :meth:`Roi2MLPHead.from_cfg` and ``FAST_RCNN.{NUM_STACKED_CONVS, CONV_HEAD_DIM}``."""
        idx = roi_feature_indices(cfg, spatial_scales)
        fr = cfg.FAST_RCNN
        return cls(in_channels, [spatial_scales[i] for i in idx], resolution=fr.ROI_XFORM_RESOLUTION,
                   sampling_ratio=fr.ROI_XFORM_SAMPLING_RATIO, num_convs=fr.NUM_STACKED_CONVS,
                   conv_dim=fr.CONV_HEAD_DIM, mlp_dim=fr.MLP_HEAD_DIM, use_gn=use_gn, aligned=fr.ROI_XFORM_ALIGNED,
                   canonical_scale=cfg.FPN.ROI_CANONICAL_SCALE, canonical_level=cfg.FPN.ROI_CANONICAL_LEVEL,
                   roi_xform=fr.ROI_XFORM_METHOD, feature_indices=idx)

    def forward(self, blob_conv: BlobConv, rois: RoIsLike) -> Tensor:
        x = roi_transform(self.roi_xform, blob_conv, rois, self.num_levels, self.feature_indices)
        for i in range(1, self.num_convs + 1):
            y = getattr(self, f"head_conv{i}")(x)
            if self.use_gn:
                y = getattr(self, f"head_conv{i}_gn")(y)
            x = relu_after(y, x)
        x = x.flatten(start_dim=1)
        return relu_after(self.fc6(x), x)


def res5_first_stride(resolution: int, dilation: int) -> int:
    """Detectron's rule for an RoI res5: stride ``resolution // 7`` (14 -> 7), or 1 when dilated."""
    return 1 if dilation > 1 else max(int(resolution) // 7, 1)


def init_res5(stage: nn.Module) -> None:
    # MSRA fill as the backbone's own stages (normally overwritten by ImageNet weights).
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetRoIConv5Head(nn.Module):
    """C4 box head: single-level RoI transform on res4, the ``res5`` stage, global average pool.

    Args:
        in_channels: res4 channels (1024; 256 for ResNet-18/34).
        resolution: RoI transform output side (Detectron: 14, so that res5's stride 2 gives 7x7).
        sampling_ratio: RoIAlign samples per bin side (``<= 0`` adaptive, Detectron's default 0).
        spatial_scale: res4 scale (1/16).
        stride_in_1x1, num_groups, width_per_group, norm: as the backbone's (res5 bottleneck width is
            ``num_groups * width_per_group * 8``).
        dilation: res5 dilation; > 1 makes the first stride 1 (Detectron).
        aligned: RoIAlign with the half-pixel offset.
        roi_xform: ``"RoIAlign"`` or ``"RoIPoolF"``.
        block: ``"bottleneck"`` or ``"basic"``; num_blocks: blocks in res5 (3).
        out_channels: res5 output channels (default ``2 * in_channels``: 2048).

    ``forward(blob_conv, rois, return_res5=False) -> (R, out_channels)``, or ``(feat, res5_map (R, out_channels,
    h, w))`` with ``return_res5=True``. The pool is a mean over the whole res5 map, which is Detectron's 7x7
    average pool for its 7x7 maps.
    """

    def __init__(self, in_channels: int = 1024, resolution: int = 14, sampling_ratio: int = 0,
                 spatial_scale: float = 1.0 / 16, stride_in_1x1: bool = True, num_groups: int = 1,
                 width_per_group: int = 64, norm: str = "FrozenBN", dilation: int = 1, aligned: bool = False,
                 roi_xform: str = "RoIAlign", block: str = "bottleneck", num_blocks: int = 3,
                 out_channels: Optional[int] = None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.roi_xform = make_roi_xform(roi_xform, resolution, [spatial_scale], sampling_ratio, aligned)
        out_channels = 2 * int(in_channels) if out_channels is None else int(out_channels)
        self.res5 = make_stage(block, in_channels, num_groups * width_per_group * 8, out_channels, num_blocks,
                               first_stride=res5_first_stride(resolution, dilation), dilation=dilation,
                               num_groups=num_groups, stride_in_1x1=stride_in_1x1, norm=norm)
        init_res5(self.res5)
        self.out_channels = out_channels

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float]) -> "ResNetRoIConv5Head":
        """Keys: ``FAST_RCNN.ROI_XFORM_*``, ``RESNETS.{STRIDE_1X1, NUM_GROUPS, WIDTH_PER_GROUP, NORM, TRANS_FUNC}``
        and the depth of ``MODEL.CONV_BODY`` (res5 block count). res5 is not dilated here, as in Detectron."""
        if len(spatial_scales) != 1:
            raise ValueError(f"ResNet_roi_conv5_head needs a single-level (C4) body, got scales {list(spatial_scales)}")
        fr, rn = cfg.FAST_RCNN, cfg.RESNETS
        block = "basic" if rn.TRANS_FUNC == "basic_transformation" else "bottleneck"
        return cls(in_channels, resolution=fr.ROI_XFORM_RESOLUTION, sampling_ratio=fr.ROI_XFORM_SAMPLING_RATIO,
                   spatial_scale=spatial_scales[0], stride_in_1x1=rn.STRIDE_1X1, num_groups=rn.NUM_GROUPS,
                   width_per_group=rn.WIDTH_PER_GROUP, norm=rn.NORM, dilation=1, aligned=fr.ROI_XFORM_ALIGNED,
                   roi_xform=fr.ROI_XFORM_METHOD, block=block, num_blocks=_res5_blocks(cfg.MODEL.CONV_BODY))

    def forward(self, blob_conv: BlobConv, rois: RoIsLike, return_res5: bool = False):
        if not isinstance(blob_conv, Tensor):
            if len(blob_conv) != 1:
                raise ValueError(f"ResNetRoIConv5Head pools from one feature map, got {len(blob_conv)}")
            blob_conv = blob_conv[0]
        res5_map = self.res5(roi_transform(self.roi_xform, blob_conv, rois, 1))
        feat = res5_map.mean(dim=(2, 3))
        return (feat, res5_map) if return_res5 else feat


def _res5_blocks(conv_body: str) -> int:
    # res5 of the body's depth (3 blocks for every bottleneck depth, 2 for ResNet-18); 3 for custom bodies.
    m = re.search(r"ResNet(\d+)_", str(conv_body))
    depth = int(m.group(1)) if m else None
    return RESNET_BLOCKS_PER_STAGE[depth][3] if depth in RESNET_BLOCKS_PER_STAGE else 3


#: ``FAST_RCNN.ROI_BOX_HEAD`` name (module prefix stripped) -> builder ``(cfg, in_channels, spatial_scales)``.
BOX_HEAD_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "roi_2mlp_head": Roi2MLPHead.from_cfg,
    "ResNet_roi_conv5_head": ResNetRoIConv5Head.from_cfg,
    "roi_Xconv1fc_head": RoiXconv1fcHead.from_cfg,
    "roi_Xconv1fc_gn_head": lambda cfg, in_channels, spatial_scales: RoiXconv1fcHead.from_cfg(
        cfg, in_channels, spatial_scales, use_gn=True),
}


def build_box_head(cfg, in_channels: int, spatial_scales: Sequence[float]) -> nn.Module:
    """The box head named by ``FAST_RCNN.ROI_BOX_HEAD`` (``fast_rcnn_heads.`` / ``ResNet.`` prefix optional)."""
    name = str(cfg.FAST_RCNN.ROI_BOX_HEAD)
    key = name.split(".", 1)[1] if "." in name else name
    if key not in BOX_HEAD_REGISTRY:
        raise ValueError(f"FAST_RCNN.ROI_BOX_HEAD = {name!r} is unknown; known: {sorted(BOX_HEAD_REGISTRY)}")
    return BOX_HEAD_REGISTRY[key](cfg, in_channels, spatial_scales)
