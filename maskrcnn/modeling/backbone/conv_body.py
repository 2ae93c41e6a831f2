"""``Conv_Body``: the bodies named by ``MODEL.CONV_BODY`` and the registry that builds them.

Built-in names (the module prefix is optional, ``ResNet50_conv4_body`` works too):

- ``ResNet.ResNet{18,34,50,101,152}_conv4_body``: :class:`ResNetConvBody` up to res4, one ``(N, C, H/16, W/16)``
  Tensor (C = 1024, or 256 for the basic-block depths 18/34); ``spatial_scales == [1/16]``.
- ``ResNet.ResNet{...}_conv5_body``: up to res5, ``(N, 2048 | 512, H/32, W/32)`` (H/16 with ``RES5_DILATION: 2``).
- ``FPN.fpn_ResNet{...}_conv5_body``: :class:`FPNConvBody`, a list ``[P2, ..., P6]`` (finest first) of
  ``(N, FPN.DIM, H/2^l, W/2^l)`` maps; ``spatial_scales == [1/4, 1/8, 1/16, 1/32, 1/64]``.

Every body has ``out_channels: int`` and ``spatial_scales: list[float]`` (finest first); sizes are rounded up
(``ceil``) when the input is not a multiple of the stride.

Config keys read: ``MODEL.CONV_BODY``; ``RESNETS.NUM_GROUPS``, ``WIDTH_PER_GROUP``, ``STRIDE_1X1``, ``FREEZE_AT``,
``NORM``, ``RES5_DILATION``, ``TRANS_FUNC`` (must agree with the depth); ``FPN.DIM``, ``USE_GN``,
``ZERO_INIT_LATERAL``, ``RPN_MAX_LEVEL``, ``ROI_MAX_LEVEL``; ``TRAIN.FREEZE_CONV_BODY`` (in :func:`build_conv_body`).

A custom body is registered by name; its builder takes the config and returns a module with ``out_channels`` (and
preferably ``spatial_scales``)::

    from maskrcnn.modeling.backbone.conv_body import CONV_BODY_REGISTRY

    class MyBody(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 64, 3, stride=16, padding=1)
            self.out_channels, self.spatial_scales = 64, [1.0 / 16]

        def forward(self, x):          # (N, 3, H, W) -> (N, 64, H/16, W/16)
            return self.conv(x)

    CONV_BODY_REGISTRY["MyBody"] = lambda cfg: MyBody()
    # with MODEL.CONV_BODY = "MyBody", build_conv_body(cfg) now returns MyBody()

``assert_and_infer_cfg`` infers ``FPN.FPN_ON`` and ``RESNETS.TRANS_FUNC`` from built-in names only: a custom body
that returns a pyramid (a list of maps, finest first) needs ``FPN.FPN_ON: True`` in its config.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import Tensor, nn

from ...config import ConfigError
from ...config.defaults import CONV_BODIES
from ...config.names import parse_conv_body_name, registry_lookup
from .fpn import FPN
from .resnet import ResNet, freeze_module

# parse_conv_body_name lives with the config (assert_and_infer_cfg reads the body name too); re-exported here.
__all__ = ["ResNetConvBody", "FPNConvBody", "CONV_BODY_REGISTRY", "build_conv_body", "parse_conv_body_name"]


def _resnet_kwargs(cfg, depth: int) -> dict:
    r = cfg.RESNETS
    basic = depth in (18, 34)
    if r.TRANS_FUNC == "basic_transformation" and not basic:
        raise ConfigError(f"RESNETS.TRANS_FUNC = 'basic_transformation' does not fit MODEL.CONV_BODY = "
                          f"{cfg.MODEL.CONV_BODY!r}: depth {depth} uses bottleneck blocks")
    return dict(block="basic" if basic else "bottleneck", num_groups=int(r.NUM_GROUPS),
                width_per_group=int(r.WIDTH_PER_GROUP), stride_in_1x1=bool(r.STRIDE_1X1), norm=str(r.NORM),
                freeze_at=int(r.FREEZE_AT), res5_dilation=int(r.RES5_DILATION),
                stem_out_channels=int(r.STEM_OUT_CHANNELS),
                res2_out_channels=int(r.RES2_OUT_CHANNELS) if int(r.RES2_OUT_CHANNELS) > 0 else None)


class ResNetConvBody(ResNet):
    """Single-level ResNet body: the output of ``res{conv_stage}`` as one ``(N, out_channels, H/s, W/s)`` Tensor.

    It *is* a :class:`ResNet` (``res1``..``res4``/``res5`` are direct children, Detectron.pytorch's names for the
    ``ResNet_conv4_body`` / ``ResNet_conv5_body`` modules). ``conv_stage`` is 4 (C4, stride 16) or 5 (stride 32, or
    16 with ``res5_dilation=2``); the other arguments are :class:`ResNet`'s.
    """

    def __init__(self, depth: int, *, conv_stage: int = 4, block: Optional[str] = None, num_groups: int = 1,
                 width_per_group: int = 64, stride_in_1x1: bool = True, norm: str = "FrozenBN", freeze_at: int = 2,
                 res5_dilation: int = 1, stem_out_channels: int = 64, res2_out_channels: Optional[int] = None):
        if conv_stage not in (4, 5):
            raise ValueError(f"conv_stage={conv_stage!r} must be 4 or 5")
        last = f"res{conv_stage}"
        super().__init__(depth, block=block, num_groups=num_groups, width_per_group=width_per_group,
                         stride_in_1x1=stride_in_1x1, norm=norm, freeze_at=freeze_at, res5_dilation=res5_dilation,
                         return_stages=(last,), stem_out_channels=stem_out_channels,
                         res2_out_channels=res2_out_channels)
        self._last = last
        self.out_channels: int = self.stage_channels[self._last]
        self.spatial_scales: List[float] = [1.0 / self.stage_strides[self._last]]

    @classmethod
    def from_cfg(cls, cfg) -> "ResNetConvBody":
        kind, depth, stage = parse_conv_body_name(cfg.MODEL.CONV_BODY)
        if kind != "resnet":
            raise ConfigError(f"MODEL.CONV_BODY = {cfg.MODEL.CONV_BODY!r} is an FPN body, not a ResNet_conv body")
        return cls(depth, conv_stage=stage, **_resnet_kwargs(cfg, depth))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[self._last]


class FPNConvBody(nn.Module):
    """ResNet res2..res5 + :class:`FPN`; ``forward(x: (N, 3, H, W)) -> [P2, ..., P_max]`` finest first.

    Args:
        depth, block, num_groups, width_per_group, stride_in_1x1, norm, freeze_at, res5_dilation,
            stem_out_channels, res2_out_channels: the :class:`ResNet` (``conv_body``) arguments.
        fpn_dim, use_gn, zero_init_lateral: the :class:`FPN` (``fpn``) arguments.
        max_level: 5 (P2..P5) or 6 (P2..P6, P6 a stride-2 subsampling of P5).

    The pyramid always starts at P2; ``spatial_scales`` are ``1 / stride`` of each returned level.
    """

    def __init__(self, depth: int, *, block: Optional[str] = None, num_groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = True, norm: str = "FrozenBN", freeze_at: int = 2, res5_dilation: int = 1,
                 fpn_dim: int = 256, use_gn: bool = False, zero_init_lateral: bool = False, max_level: int = 6,
                 stem_out_channels: int = 64, res2_out_channels: Optional[int] = None):
        super().__init__()
        if max_level not in (5, 6):
            raise ValueError(f"max_level={max_level!r} must be 5 (P2..P5) or 6 (P2..P6)")
        self.conv_body = ResNet(depth, block=block, num_groups=num_groups, width_per_group=width_per_group,
                                stride_in_1x1=stride_in_1x1, norm=norm, freeze_at=freeze_at,
                                res5_dilation=res5_dilation, return_stages=("res2", "res3", "res4", "res5"),
                                stem_out_channels=stem_out_channels, res2_out_channels=res2_out_channels)
        names = self.conv_body.return_stages
        self.fpn = FPN([self.conv_body.stage_channels[n] for n in names], out_channels=fpn_dim, use_gn=use_gn,
                       zero_init_lateral=zero_init_lateral, top_block="maxpool" if max_level == 6 else None)
        strides = [self.conv_body.stage_strides[n] for n in names]
        if max_level == 6:
            strides.append(strides[-1] * 2)
        self.out_channels: int = int(fpn_dim)
        self.spatial_scales: List[float] = [1.0 / s for s in strides]

    @classmethod
    def from_cfg(cls, cfg) -> "FPNConvBody":
        kind, depth, _ = parse_conv_body_name(cfg.MODEL.CONV_BODY)
        if kind != "fpn":
            raise ConfigError(f"MODEL.CONV_BODY = {cfg.MODEL.CONV_BODY!r} is not an FPN body")
        f = cfg.FPN
        # The RPN and the RoI heads pick their levels out of one pyramid, which must reach the coarser of the two.
        max_level = max(int(f.RPN_MAX_LEVEL), int(f.ROI_MAX_LEVEL), 5)
        if max_level > 6:
            raise ConfigError(f"FPN.RPN_MAX_LEVEL = {f.RPN_MAX_LEVEL} / FPN.ROI_MAX_LEVEL = {f.ROI_MAX_LEVEL}: "
                              f"the FPN bodies build levels up to 6 (P6) only")
        return cls(depth, fpn_dim=int(f.DIM), use_gn=bool(f.USE_GN), zero_init_lateral=bool(f.ZERO_INIT_LATERAL),
                   max_level=max_level, **_resnet_kwargs(cfg, depth))

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.fpn(list(self.conv_body(x).values()))


#: ``MODEL.CONV_BODY`` name -> builder ``callable(cfg) -> nn.Module``. Add entries to register custom bodies.
CONV_BODY_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    name: (FPNConvBody.from_cfg if parse_conv_body_name(name).kind == "fpn" else ResNetConvBody.from_cfg)
    for name in CONV_BODIES
}


def build_conv_body(cfg) -> nn.Module:
    """The body named by ``cfg.MODEL.CONV_BODY`` (looked up in :data:`CONV_BODY_REGISTRY`). With
    ``TRAIN.FREEZE_CONV_BODY`` every parameter of it is frozen (BatchNorm layers become FrozenBatchNorm2d)."""
    name = str(cfg.MODEL.CONV_BODY)
    body = registry_lookup(CONV_BODY_REGISTRY, name, key="MODEL.CONV_BODY", what="conv body")(cfg)
    if not isinstance(body, nn.Module) or not hasattr(body, "out_channels"):
        raise ConfigError(f"MODEL.CONV_BODY = {name!r}: the builder returned {type(body).__name__}, which is not an "
                          f"nn.Module with an `out_channels` attribute")
    if cfg.TRAIN.FREEZE_CONV_BODY:
        body = freeze_module(body)
    return body
