"""``Mask_Head``: RoI features for the mask branch (Detectron's ``mask_rcnn_heads``).

- :class:`MaskRCNNFCNHead` (``mask_rcnn_fcn_head_v1up4convs`` / ``_v1up``, FPN): RoIAlign to ``C x 14 x 14``,
  ``num_convs`` 3x3 convs ``mask_fcn1..N`` with ReLU, ``conv5_mask`` 2x2 stride-2 deconv with ReLU ->
  ``(R, dim, 28, 28)``. torchvision's ``mask_head`` + ``mask_predictor.conv5_mask`` compute the same. With
  ``use_gn`` (``mask_rcnn_fcn_head_v1up4convs_gn``, Detectron's GN configs) each conv is followed by a GroupNorm
  ``mask_fcn{i}_gn`` and has no bias (Detectron's blobs ``_mask_fcn{i}_w``, ``_mask_fcn{i}_gn_{s,b}``).
- :class:`MaskRCNNHeadV0UpShare` (``_v0upshare``, C4): the box head's res5 map ``(R, 2048, 7, 7)`` ->
  ``conv5_mask`` deconv + ReLU -> ``(R, dim, 14, 14)``. It owns no res5: the caller gets the map from
  ``ResNetRoIConv5Head(..., return_res5=True)`` (foreground rows during training, detections at test time).
- :class:`MaskRCNNHeadV0Up` (``_v0up``, C4): its own RoI transform on res4 and its own res5, then ``conv5_mask``.

Init (``conv_init``): ``"MSRAFill"`` (He normal on fan_out, as Detectron and torchvision) or ``"GaussianFill"``
(normal std 0.001); biases 0.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from torch import Tensor, nn

from ..activation import relu_after, relu_stack, run_fused_stack
from ..backbone.norms import group_norm
from ..backbone.resnet import make_stage
from .box_head import (BlobConv, RoIsLike, init_res5, make_roi_xform, res5_first_stride, roi_feature_indices,
                       roi_transform)

__all__ = [
    "MaskRCNNFCNHead", "MaskRCNNHeadV0UpShare", "MaskRCNNHeadV0Up", "MASK_HEAD_REGISTRY", "build_mask_head",
    "init_conv",
]

CONV_INITS = ("MSRAFill", "GaussianFill")


def init_conv(conv: nn.Module, conv_init: str) -> None:
    """Detectron's ``MRCNN.CONV_INIT`` on a (transposed) convolution; bias 0."""
    if conv_init == "MSRAFill":
        # For ConvTranspose2d, dim 0 of the weight is the input: fan_out = in * k * k, as Caffe2's MSRAFill.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif conv_init == "GaussianFill":
        nn.init.normal_(conv.weight, std=0.001)
    else:
        raise ValueError(f"conv_init={conv_init!r} is not supported; use one of {CONV_INITS}")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MaskRCNNFCNHead(nn.Module):
    """FCN mask head (v1upXconvs).

    Args:
        in_channels: channels of the pooled maps (FPN: 256).
        scales: spatial scales of the pooled levels, finest first; one scale means single-level pooling.
        resolution: RoI transform output side (14); the output is ``2 * resolution``.
        sampling_ratio: RoIAlign samples per bin side (``<= 0`` adaptive).
        num_convs: 3x3 convolutions (4 for v1up4convs, 2 for v1up; 0 allowed).
        dim: their channels and the deconv's (``out_channels``).
        dilation: dilation (and padding) of the 3x3 convolutions.
        aligned, canonical_scale, canonical_level, roi_xform, feature_indices: as :class:`Roi2MLPHead`.
        conv_init: ``"MSRAFill"`` or ``"GaussianFill"``.
        use_gn: GroupNorm (32 groups) after every 3x3 conv (``mask_fcn{i}_gn``); the convs then have no bias.

    ``forward(blob_conv, rois) -> (R, dim, 2 * resolution, 2 * resolution)``.
    """

    shares_box_head_res5 = False

    def __init__(self, in_channels: int, scales: Sequence[float], resolution: int = 14, sampling_ratio: int = 2,
                 num_convs: int = 4, dim: int = 256, dilation: int = 1, aligned: bool = False,
                 canonical_scale: int = 224, canonical_level: int = 4, roi_xform: str = "RoIAlign",
                 feature_indices: Optional[Sequence[int]] = None, conv_init: str = "MSRAFill",
                 use_gn: bool = False):
        super().__init__()
        if in_channels < 1 or dim < 1 or num_convs < 0 or dilation < 1:
            raise ValueError(f"need in_channels >= 1, dim >= 1, num_convs >= 0, dilation >= 1; got "
                             f"in_channels={in_channels}, dim={dim}, num_convs={num_convs}, dilation={dilation}")
        self.roi_xform = make_roi_xform(roi_xform, resolution, scales, sampling_ratio, aligned, canonical_scale,
                                        canonical_level)
        self.num_levels = len(scales)
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        self.num_convs = int(num_convs)
        self.use_gn = bool(use_gn)
        channels = in_channels
        for i in range(1, self.num_convs + 1):
            conv = nn.Conv2d(channels, dim, 3, padding=dilation, dilation=dilation, bias=not self.use_gn)
            init_conv(conv, conv_init)
            self.add_module(f"mask_fcn{i}", conv)
            if self.use_gn:
                self.add_module(f"mask_fcn{i}_gn", group_norm(dim))
            channels = dim
        self.conv5_mask = nn.ConvTranspose2d(channels, dim, 2, stride=2)
        init_conv(self.conv5_mask, conv_init)
        self.out_channels = int(dim)
        self.fused_stack: Optional[nn.Module] = None

    def feature_stack(self) -> Optional[nn.Sequential]:
        """The layers ``forward`` runs on the pooled maps, as one ``nn.Sequential`` (``relu_stack``): every conv
        and ``conv5_mask``, each with its ReLU. None with GroupNorm (not a plain conv/ReLU chain)."""
        if self.use_gn:
            return None
        return relu_stack([getattr(self, f"mask_fcn{i}") for i in range(1, self.num_convs + 1)] + [self.conv5_mask])

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float], num_convs: Optional[int] = None,
                 use_gn: bool = False) -> "MaskRCNNFCNHead":
        """Keys: ``MRCNN.{ROI_XFORM_METHOD, ROI_XFORM_RESOLUTION, ROI_XFORM_SAMPLING_RATIO, DIM_REDUCED, NUM_CONVS,
        DILATION, CONV_INIT}``, ``FAST_RCNN.ROI_XFORM_ALIGNED``, ``FPN.ROI_*``."""
        idx = roi_feature_indices(cfg, spatial_scales)
        m = cfg.MRCNN
        return cls(in_channels, [spatial_scales[i] for i in idx], resolution=m.ROI_XFORM_RESOLUTION,
                   sampling_ratio=m.ROI_XFORM_SAMPLING_RATIO,
                   num_convs=m.NUM_CONVS if num_convs is None else num_convs, dim=m.DIM_REDUCED,
                   dilation=m.DILATION, aligned=cfg.FAST_RCNN.ROI_XFORM_ALIGNED,
                   canonical_scale=cfg.FPN.ROI_CANONICAL_SCALE, canonical_level=cfg.FPN.ROI_CANONICAL_LEVEL,
                   roi_xform=m.ROI_XFORM_METHOD, feature_indices=idx, conv_init=m.CONV_INIT, use_gn=use_gn)

    def forward(self, blob_conv: BlobConv, rois: RoIsLike) -> Tensor:
        x = roi_transform(self.roi_xform, blob_conv, rois, self.num_levels, self.feature_indices)
        fused = run_fused_stack(self, x)
        if fused is not None:
            return fused
        for i in range(1, self.num_convs + 1):
            y = getattr(self, f"mask_fcn{i}")(x)
            if self.use_gn:
                y = getattr(self, f"mask_fcn{i}_gn")(y)
            x = relu_after(y, x)
        return relu_after(self.conv5_mask(x), x)


class MaskRCNNHeadV0UpShare(nn.Module):
    """C4 mask head sharing the box head's res5: ``(R, dim_in, h, w)`` res5 map -> ``(R, dim, 2h, 2w)``.

    Args:
        dim_in: res5 channels (2048).
        dim: deconv output channels (``MRCNN.DIM_REDUCED``, ``out_channels``).
        conv_init: ``"MSRAFill"`` or ``"GaussianFill"``.
    """

    shares_box_head_res5 = True

    def __init__(self, dim_in: int = 2048, dim: int = 256, conv_init: str = "MSRAFill"):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(dim_in, dim, 2, stride=2)
        init_conv(self.conv5_mask, conv_init)
        self.out_channels = int(dim)

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float], box_head: Optional[nn.Module] = None
                 ) -> "MaskRCNNHeadV0UpShare":
        """``dim_in`` is ``box_head.out_channels`` (its res5 width), else ``2 * in_channels``. Keys:
        ``MRCNN.{DIM_REDUCED, CONV_INIT}``."""
        dim_in = int(box_head.out_channels) if box_head is not None else 2 * int(in_channels)
        return cls(dim_in, cfg.MRCNN.DIM_REDUCED, cfg.MRCNN.CONV_INIT)

    def forward(self, res5_map: Tensor) -> Tensor:
        if not isinstance(res5_map, Tensor) or res5_map.dim() != 4 or res5_map.shape[1] != self.conv5_mask.in_channels:
            shape = tuple(res5_map.shape) if isinstance(res5_map, Tensor) else type(res5_map).__name__
            raise ValueError(f"MaskRCNNHeadV0UpShare takes the box head's res5 map (R, "
                             f"{self.conv5_mask.in_channels}, h, w), got {shape}")
        return relu_after(self.conv5_mask(res5_map), res5_map)


class MaskRCNNHeadV0Up(nn.Module):
    """C4 mask head with its own res5 (v0up): RoI transform on res4, ``res5``, ``conv5_mask`` deconv + ReLU.

    Args:
        in_channels: res4 channels (1024).
        resolution, sampling_ratio, spatial_scale, aligned, roi_xform: the RoI transform (14, 0, 1/16).
        dim: deconv channels (``out_channels``).
        dilation: res5 dilation (``MRCNN.DILATION``); > 1 makes res5's first stride 1 (Detectron).
        stride_in_1x1, num_groups, width_per_group, norm, block, num_blocks, res5_channels: res5 layout
            (bottleneck width ``num_groups * width_per_group * 8``; output ``2 * in_channels`` by default).
        conv_init: init of ``conv5_mask``.

    ``forward(blob_conv, rois) -> (R, dim, 2 * h5, 2 * w5)`` where ``h5`` is res5's output side (7 for 14 / stride 2).
    """

    shares_box_head_res5 = False

    def __init__(self, in_channels: int = 1024, resolution: int = 14, sampling_ratio: int = 0,
                 spatial_scale: float = 1.0 / 16, dim: int = 256, dilation: int = 1, stride_in_1x1: bool = True,
                 num_groups: int = 1, width_per_group: int = 64, norm: str = "FrozenBN", aligned: bool = False,
                 roi_xform: str = "RoIAlign", block: str = "bottleneck", num_blocks: int = 3,
                 res5_channels: Optional[int] = None, conv_init: str = "MSRAFill"):
        super().__init__()
        self.roi_xform = make_roi_xform(roi_xform, resolution, [spatial_scale], sampling_ratio, aligned)
        res5_channels = 2 * int(in_channels) if res5_channels is None else int(res5_channels)
        self.res5 = make_stage(block, in_channels, num_groups * width_per_group * 8, res5_channels, num_blocks,
                               first_stride=res5_first_stride(resolution, dilation), dilation=dilation,
                               num_groups=num_groups, stride_in_1x1=stride_in_1x1, norm=norm)
        init_res5(self.res5)
        self.conv5_mask = nn.ConvTranspose2d(res5_channels, dim, 2, stride=2)
        init_conv(self.conv5_mask, conv_init)
        self.out_channels = int(dim)

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float]) -> "MaskRCNNHeadV0Up":
        """Keys: ``MRCNN.{ROI_XFORM_*, DIM_REDUCED, DILATION, CONV_INIT}``, ``FAST_RCNN.ROI_XFORM_ALIGNED``,
        ``RESNETS.{STRIDE_1X1, NUM_GROUPS, WIDTH_PER_GROUP, NORM, TRANS_FUNC}``."""
        if len(spatial_scales) != 1:
            raise ValueError(f"mask_rcnn_fcn_head_v0up needs a single-level (C4) body, got {list(spatial_scales)}")
        m, rn = cfg.MRCNN, cfg.RESNETS
        block = "basic" if rn.TRANS_FUNC == "basic_transformation" else "bottleneck"
        return cls(in_channels, resolution=m.ROI_XFORM_RESOLUTION, sampling_ratio=m.ROI_XFORM_SAMPLING_RATIO,
                   spatial_scale=spatial_scales[0], dim=m.DIM_REDUCED, dilation=m.DILATION,
                   stride_in_1x1=rn.STRIDE_1X1, num_groups=rn.NUM_GROUPS, width_per_group=rn.WIDTH_PER_GROUP,
                   norm=rn.NORM, aligned=cfg.FAST_RCNN.ROI_XFORM_ALIGNED, roi_xform=m.ROI_XFORM_METHOD,
                   block=block, conv_init=m.CONV_INIT)

    def forward(self, blob_conv: BlobConv, rois: RoIsLike) -> Tensor:
        if not isinstance(blob_conv, Tensor):
            if len(blob_conv) != 1:
                raise ValueError(f"MaskRCNNHeadV0Up pools from one feature map, got {len(blob_conv)}")
            blob_conv = blob_conv[0]
        x = self.res5(roi_transform(self.roi_xform, blob_conv, rois, 1))
        return relu_after(self.conv5_mask(x), x)


def _v1up4convs(cfg, in_channels, spatial_scales, box_head=None):
    return MaskRCNNFCNHead.from_cfg(cfg, in_channels, spatial_scales)


def _v1up4convs_gn(cfg, in_channels, spatial_scales, box_head=None):
    return MaskRCNNFCNHead.from_cfg(cfg, in_channels, spatial_scales, use_gn=True)


def _v1up(cfg, in_channels, spatial_scales, box_head=None):
    return MaskRCNNFCNHead.from_cfg(cfg, in_channels, spatial_scales, num_convs=2)


def _v0upshare(cfg, in_channels, spatial_scales, box_head=None):
    return MaskRCNNHeadV0UpShare.from_cfg(cfg, in_channels, spatial_scales, box_head=box_head)


def _v0up(cfg, in_channels, spatial_scales, box_head=None):
    return MaskRCNNHeadV0Up.from_cfg(cfg, in_channels, spatial_scales)


#: ``MRCNN.ROI_MASK_HEAD`` name (``mask_rcnn_heads.`` prefix stripped) -> builder
#: ``(cfg, in_channels, spatial_scales, box_head=None)``.
MASK_HEAD_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "mask_rcnn_fcn_head_v1up4convs": _v1up4convs,
    "mask_rcnn_fcn_head_v1up4convs_gn": _v1up4convs_gn,
    "mask_rcnn_fcn_head_v1up": _v1up,
    "mask_rcnn_fcn_head_v0upshare": _v0upshare,
    "mask_rcnn_fcn_head_v0up": _v0up,
}


def build_mask_head(cfg, in_channels: int, spatial_scales: Sequence[float], box_head: Optional[nn.Module] = None
                    ) -> nn.Module:
    """The mask head named by ``MRCNN.ROI_MASK_HEAD``. v1up4convs uses ``MRCNN.NUM_CONVS`` convolutions (4 by
    default; also the _gn variant), v1up always 2; v0upshare reads its input width from ``box_head``."""
    name = str(cfg.MRCNN.ROI_MASK_HEAD)
    key = name.split(".", 1)[1] if "." in name else name
    if key not in MASK_HEAD_REGISTRY:
        raise ValueError(f"MRCNN.ROI_MASK_HEAD = {name!r} is unknown; known: {sorted(MASK_HEAD_REGISTRY)}")
    return MASK_HEAD_REGISTRY[key](cfg, in_channels, spatial_scales, box_head=box_head)
