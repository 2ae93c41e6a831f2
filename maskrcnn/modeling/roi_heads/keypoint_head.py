"""``Keypoint_Head``: RoI features for the keypoint branch (Detectron's ``keypoint_rcnn_heads``).

:class:`KeypointRCNNConvHead` (``roi_pose_head_v1convX``): RoIAlign to ``C x R x R`` (``KRCNN.ROI_XFORM_RESOLUTION``,
14), then ``num_convs`` (``KRCNN.NUM_STACKED_CONVS``, 8) ``kernel x kernel`` convolutions ``conv_fcn1..N`` of
``dim`` channels (``KRCNN.CONV_HEAD_DIM``, 512), each followed by a ReLU -> ``(R, dim, R, R)``. torchvision's
``KeypointRCNNHeads`` (``roi_heads.keypoint_head``) computes the same; Detectron names the blobs ``conv_fcn{i}``.

Init (``conv_init``): ``"MSRAFill"`` (He normal on fan_out, Detectron's keypoint configs and torchvision) or
``"GaussianFill"`` (normal std 0.01, Detectron's default); biases 0.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from torch import Tensor, nn

from ..activation import relu_after, relu_stack, run_fused_stack
from .box_head import BlobConv, RoIsLike, make_roi_xform, roi_feature_indices, roi_transform

__all__ = ["KeypointRCNNConvHead", "KEYPOINT_HEAD_REGISTRY", "build_keypoint_head", "init_keypoint_conv"]

CONV_INITS = ("MSRAFill", "GaussianFill")


def init_keypoint_conv(conv: nn.Module, conv_init: str) -> None:
    """Detectron's ``KRCNN.CONV_INIT`` on a (transposed) convolution; bias 0."""
    if conv_init == "MSRAFill":
        # For ConvTranspose2d, dim 0 of the weight is the input: fan_out = in * k * k, as torchvision's predictor.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    elif conv_init == "GaussianFill":
        nn.init.normal_(conv.weight, std=0.01)
    else:
        raise ValueError(f"KRCNN.CONV_INIT = {conv_init!r} is not supported; use one of {CONV_INITS}")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class KeypointRCNNConvHead(nn.Module):
    """Stacked-conv keypoint head (``roi_pose_head_v1convX``).

    Args:
        in_channels: channels of the pooled maps (FPN: 256).
        scales: spatial scales of the pooled levels, finest first; one scale means single-level pooling.
        resolution: RoI transform output side (14).
        sampling_ratio: RoIAlign samples per bin side (2 as torchvision; ``<= 0`` adaptive).
        num_convs: convolutions (8; 0 allowed, then ``out_channels == in_channels``).
        dim: their channels (512, ``out_channels``).
        kernel: their (odd) kernel side; padding ``kernel // 2`` keeps the side.
        aligned, canonical_scale, canonical_level, roi_xform, feature_indices: as
            :class:`~maskrcnn.modeling.roi_heads.box_head.Roi2MLPHead`.
        conv_init: ``"MSRAFill"`` or ``"GaussianFill"``.

    ``forward(blob_conv, rois) -> (R, dim, resolution, resolution)`` float.
    """

    def __init__(self, in_channels: int, scales: Sequence[float], resolution: int = 14, sampling_ratio: int = 2,
                 num_convs: int = 8, dim: int = 512, kernel: int = 3, aligned: bool = False,
                 canonical_scale: int = 224, canonical_level: int = 4, roi_xform: str = "RoIAlign",
                 feature_indices: Optional[Sequence[int]] = None, conv_init: str = "MSRAFill"):
        super().__init__()
        if in_channels < 1 or dim < 1 or num_convs < 0 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need in_channels >= 1, dim >= 1, num_convs >= 0 and an odd kernel; got "
                             f"in_channels={in_channels}, dim={dim}, num_convs={num_convs}, kernel={kernel}")
        self.roi_xform = make_roi_xform(roi_xform, resolution, scales, sampling_ratio, aligned, canonical_scale,
                                        canonical_level)
        self.num_levels = len(scales)
        self.feature_indices = None if feature_indices is None else [int(i) for i in feature_indices]
        self.num_convs = int(num_convs)
        channels = int(in_channels)
        for i in range(1, self.num_convs + 1):
            conv = nn.Conv2d(channels, dim, kernel, padding=kernel // 2)
            init_keypoint_conv(conv, conv_init)
            self.add_module(f"conv_fcn{i}", conv)
            channels = int(dim)
        self.out_channels = channels
        self.fused_stack: Optional[nn.Module] = None

    def feature_stack(self) -> Optional[nn.Sequential]:
        """The convs ``forward`` runs on the pooled maps, each with its ReLU, as one ``nn.Sequential``
        (``relu_stack``); None without convs."""
        return relu_stack([getattr(self, f"conv_fcn{i}") for i in range(1, self.num_convs + 1)]) \
            if self.num_convs else None

    @classmethod
    def from_cfg(cls, cfg, in_channels: int, spatial_scales: Sequence[float]) -> "KeypointRCNNConvHead":
        """Keys: ``KRCNN.{ROI_XFORM_METHOD, ROI_XFORM_RESOLUTION, ROI_XFORM_SAMPLING_RATIO, NUM_STACKED_CONVS,
        CONV_HEAD_DIM, CONV_HEAD_KERNEL, CONV_INIT}``, ``FAST_RCNN.ROI_XFORM_ALIGNED``, ``FPN.ROI_*``."""
        idx = roi_feature_indices(cfg, spatial_scales)
        k = cfg.KRCNN
        return cls(in_channels, [spatial_scales[i] for i in idx], resolution=k.ROI_XFORM_RESOLUTION,
                   sampling_ratio=k.ROI_XFORM_SAMPLING_RATIO, num_convs=k.NUM_STACKED_CONVS, dim=k.CONV_HEAD_DIM,
                   kernel=k.CONV_HEAD_KERNEL, aligned=cfg.FAST_RCNN.ROI_XFORM_ALIGNED,
                   canonical_scale=cfg.FPN.ROI_CANONICAL_SCALE, canonical_level=cfg.FPN.ROI_CANONICAL_LEVEL,
                   roi_xform=k.ROI_XFORM_METHOD, feature_indices=idx, conv_init=k.CONV_INIT)

    def forward(self, blob_conv: BlobConv, rois: RoIsLike) -> Tensor:
        x = roi_transform(self.roi_xform, blob_conv, rois, self.num_levels, self.feature_indices)
        fused = run_fused_stack(self, x)
        if fused is not None:
            return fused
        for i in range(1, self.num_convs + 1):
            x = relu_after(getattr(self, f"conv_fcn{i}")(x), x)
        return x


def _v1convx(cfg, in_channels, spatial_scales):
    return KeypointRCNNConvHead.from_cfg(cfg, in_channels, spatial_scales)


#: ``KRCNN.ROI_KEYPOINTS_HEAD`` name (``keypoint_rcnn_heads.`` prefix stripped) -> builder
#: ``(cfg, in_channels, spatial_scales)``.
KEYPOINT_HEAD_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "roi_pose_head_v1convX": _v1convx,
}


def build_keypoint_head(cfg, in_channels: int, spatial_scales: Sequence[float]) -> nn.Module:
    """The keypoint head named by ``KRCNN.ROI_KEYPOINTS_HEAD``."""
    name = str(cfg.KRCNN.ROI_KEYPOINTS_HEAD)
    key = name.split(".", 1)[1] if "." in name else name
    if key not in KEYPOINT_HEAD_REGISTRY:
        raise ValueError(f"KRCNN.ROI_KEYPOINTS_HEAD = {name!r} is unknown; known: {sorted(KEYPOINT_HEAD_REGISTRY)}")
    return KEYPOINT_HEAD_REGISTRY[key](cfg, in_channels, spatial_scales)
