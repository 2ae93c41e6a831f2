"""Normalisation layers of the bodies and heads, and the model-level norm checks.

``RESNETS.NORM`` names the body's (and the C4 heads' res5) norm:

* ``FrozenBN`` — :class:`FrozenBatchNorm2d`: fixed statistics and affine (Detectron's AffineChannel). Only sensible
  on top of pretrained weights: on a random backbone it is the identity and activations grow with depth.
* ``BN`` — ``nn.BatchNorm2d`` with per-process batch statistics.
* ``SyncBN`` — built as ``nn.BatchNorm2d`` (so one process trains exactly as ``BN``); under DDP
  :func:`convert_sync_batchnorm` turns every BatchNorm into ``nn.SyncBatchNorm`` (statistics over the whole
  batch of all processes; CUDA only, torch's restriction).
* ``GN`` — ``nn.GroupNorm`` with :data:`GN_GROUPS` groups (eps 1e-5, Detectron's ``GROUP_NORM`` defaults).

State-dict keys are the same for every kind (weight, bias, plus BatchNorm's running statistics).
"""
from __future__ import annotations

from typing import List

from torch import nn

from ...config.errors import ConfigError
from .frozen_bn import FrozenBatchNorm2d

__all__ = ["NORMS", "GN_GROUPS", "get_norm", "group_norm", "convert_sync_batchnorm", "revert_sync_batchnorm",
           "frozen_bn_layers", "check_trainable_from_scratch"]

#: Values of ``RESNETS.NORM``.
NORMS = ("FrozenBN", "BN", "SyncBN", "GN")
#: Groups of every GroupNorm (Detectron's ``GROUP_NORM.NUM_GROUPS``; its ``DIM_PER_GP`` is -1).
GN_GROUPS = 32


def group_norm(channels: int, groups: int = GN_GROUPS) -> nn.GroupNorm:
    """``nn.GroupNorm(groups, channels)``; a layer narrower than ``groups`` channels (the narrow bodies trained
    from scratch, ``RESNETS.STEM_OUT_CHANNELS`` 8) gets one group per channel. An error naming both when a wider
    ``channels`` is not divisible by ``groups``."""
    if channels < groups:
        return nn.GroupNorm(channels, channels)
    if channels % groups != 0:
        raise ValueError(f"GN needs channels divisible by {groups} (or fewer than {groups}), got channels={channels}")
    return nn.GroupNorm(groups, channels)


def get_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer over ``channels`` for ``norm`` in :data:`NORMS` (``SyncBN`` is a BatchNorm2d until
    :func:`convert_sync_batchnorm`)."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return group_norm(channels)
    if norm in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm={norm!r} is not supported; use one of {', '.join(repr(n) for n in NORMS)}")


def convert_sync_batchnorm(model: nn.Module, norm: str, world_size: int, device_type: str) -> nn.Module:
    """With ``norm == "SyncBN"`` and several processes, ``model`` with every ``nn.BatchNorm*`` replaced by
    ``nn.SyncBatchNorm`` (same parameter objects and state-dict keys, so an optimizer built before still holds
    them); otherwise ``model`` unchanged (one process: plain BatchNorm computes the same statistics).

    Raises ValueError when SyncBN is asked across processes off CUDA (torch's SyncBatchNorm runs on GPUs only).
    Call it before wrapping the model in DDP.
    """
    if norm != "SyncBN" or int(world_size) <= 1:
        return model
    if device_type != "cuda":
        raise ValueError(f"RESNETS.NORM = 'SyncBN' across {world_size} processes needs CUDA (torch's SyncBatchNorm "
                         f"does not run on {device_type!r}); on the CPU use RESNETS.NORM 'BN' (per-process "
                         f"statistics) or 'GN'")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``nn.SyncBatchNorm`` in ``module`` back to an ``nn.BatchNorm2d`` with the same tensors (in place;
    returns the module or its replacement), so that inference on one process and the BN folds of
    :mod:`maskrcnn.engine.speed` see plain BatchNorm."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def frozen_bn_layers(module: nn.Module) -> List[str]:
    """Names of the :class:`FrozenBatchNorm2d` layers in ``module`` (also those a training-time BN fold wraps)."""
    return [name for name, m in module.named_modules() if isinstance(m, FrozenBatchNorm2d)]


def check_trainable_from_scratch(model: nn.Module, source: str = "the config") -> None:
    """The guard for training without pretrained weights: raise :class:`ConfigError` when ``model`` (whose weights
    are all random) holds FrozenBatchNorm layers, naming the fix.

    A frozen BatchNorm with its initial statistics is the identity, so on a random backbone nothing normalises the
    activations: they grow block after block and the loss turns non-finite within a few iterations (with a message
    that would blame the learning rate). ``RESNETS.NORM 'FrozenBN'`` makes every body norm frozen, and
    ``RESNETS.FREEZE_AT > 0`` or ``TRAIN.FREEZE_CONV_BODY`` freeze the BatchNorms of the frozen stages.
    """
    frozen = frozen_bn_layers(model)
    if not frozen:
        return
    shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
    raise ConfigError(
        f"{source}: training from scratch (no pretrained weights are loaded: no --load_ckpt / --load_detectron / "
        f"--resume checkpoint, MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS False) with {len(frozen)} frozen BatchNorm "
        f"layer(s) ({shown}). A frozen BatchNorm on a random backbone normalises nothing, so the activations grow "
        f"layer after layer and the loss becomes non-finite within a few iterations. Fix: make the norms trainable "
        f"(RESNETS.NORM GN, with FPN.USE_GN True and the GN heads FAST_RCNN.ROI_BOX_HEAD "
        f"fast_rcnn_heads.roi_Xconv1fc_gn_head and MRCNN.ROI_MASK_HEAD mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs_gn, "
        f"or RESNETS.NORM BN / SyncBN; with RESNETS.FREEZE_AT 0, TRAIN.FREEZE_CONV_BODY False and TRAIN.FUSE_FROZEN_BN "
        f"False: see configs/scratch/), or start from ImageNet weights (MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS True "
        f"with RESNETS.IMAGENET_PRETRAINED_WEIGHTS, or --load_ckpt).")
