"""``Generalized_RCNN``: preprocess -> ``Conv_Body`` -> ``RPN`` -> ``ROIHeads`` -> postprocess, and nothing else.

Eval: ``model(images)`` with ``images`` a list of ``(3, H, W)`` float RGB tensors in ``[0, 1]`` returns, per image,
``{"boxes": (N, 4) x1y1x2y2 input pixels, "labels": (N,) int64 in 1..K, "scores": (N,), "masks": (N, 1, H, W)
float probabilities}``, plus with ``MODEL.KEYPOINTS_ON`` ``"keypoints": (N, K, 3)`` (x, y, 1 in input pixels) and
``"keypoints_scores": (N, K)``.

Train: ``model(images, targets)`` with targets ``{"boxes": (G, 4), "labels": (G,) int64, "masks": (G, H, W) uint8,
optional "iscrowd": (G,)}`` (and ``"keypoints": (G, K, 3)`` x, y, visibility with ``MODEL.KEYPOINTS_ON``) returns
``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"[, "loss_keypoint"]}``.
Crowd instances (``iscrowd == 1``) are never trained as objects: anchors and RoIs covering them are ignored.

Three ways to build one:

- ``Generalized_RCNN(cfg)`` / ``Generalized_RCNN()`` (the global ``cfg``, Detectron style), optionally with parts
  that replace what the config would build: ``Generalized_RCNN(cfg, conv_body=my_backbone, box_outs=...)``;
- ``Generalized_RCNN.from_cfg(cfg, **parts)``, the same as a classmethod;
- ``Generalized_RCNN.from_parts(preprocess=..., conv_body=..., rpn=..., roi_heads=...)``: explicit parts, no config
  is read to build anything (torchvision's ``GeneralizedRCNN(backbone, rpn, roi_heads, transform)``).

The heads stay reachable under their Detectron names (``model.Box_Head``, ``model.Box_Outs``, ``model.Mask_Head``,
``model.Mask_Outs``: properties of ``model.roi_heads``, also assignable) and keep their state-dict keys
(``Box_Head.fc6.weight``, see ``flat_state_dict.py``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import assert_and_infer_cfg, get_cfg
from ..config import cfg as global_cfg
from .backbone.conv_body import build_conv_body
from .flat_state_dict import flatten_child_state_dict
from .ops_backend import apply_ops_backend
from .preprocess import ImageList, Preprocessor
from .roi_heads.cascade import CascadeROIHeads
from .roi_heads.roi_heads import ROIHeads
from .rpn.rpn import RPN

__all__ = ["Generalized_RCNN", "infer_spatial_scales"]

#: Detectron names of the heads that live in ``model.roi_heads`` and are reachable from the model.
ROI_HEAD_PARTS = ("Box_Head", "Box_Outs", "Mask_Head", "Mask_Outs", "Keypoint_Head", "Keypoint_Outs")


def _as_list(blob_conv: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    return [blob_conv] if isinstance(blob_conv, Tensor) else list(blob_conv)


@torch.no_grad()
def infer_spatial_scales(conv_body: nn.Module, size: int = 256) -> List[float]:
    """Feature-map scales of a body that does not declare ``spatial_scales`` (e.g. a user's backbone), found by
    running it once on a ``size x size`` zero image; each scale is rounded to a power of two as torchvision does."""
    was_training = conv_body.training
    conv_body.eval()
    try:
        param = next(iter(conv_body.parameters()), None)
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        feats = _as_list(conv_body(x))
    finally:
        conv_body.train(was_training)
    scales = []
    for f in feats:
        approx = f.shape[-1] / float(size)
        scales.append(2.0 ** round(torch.log2(torch.tensor(approx)).item()))
    return scales


def _validated(cfg):
    cfg = (global_cfg if cfg is None else cfg).clone()
    cfg.defrost()
    assert_and_infer_cfg(cfg, make_immutable=True)
    return cfg


def _roi_head_part(name: str) -> property:
    def get(self: "Generalized_RCNN") -> nn.Module:
        part = getattr(self.roi_heads, name) if self.roi_heads is not None else None
        if part is None:
            raise AttributeError(f"{type(self).__name__} has no {name} (MODEL.RPN_ONLY, or MODEL.MASK_ON off)")
        return part

    def set_(self: "Generalized_RCNN", module: nn.Module) -> None:
        if self.roi_heads is None:
            raise AttributeError(f"an RPN-only {type(self).__name__} has no RoI heads to hold {name}")
        setattr(self.roi_heads, name, module)

    return property(get, set_, doc=f"``roi_heads.{name}`` (Detectron.pytorch's ``model.{name}``).")


class Generalized_RCNN(nn.Module):  # noqa: N801 (Detectron's name)
    """Mask R-CNN / Faster R-CNN in the Detectron layout.

    Args:
        cfg: a config (``maskrcnn.config.get_cfg()`` merged with a file); ``None`` means the global ``cfg``
            (Detectron style). It is validated (and FPN/block type inferred) on a copy, kept as ``model.cfg`` (the
            tools and the Detectron API read their test settings from it).
        preprocess, conv_body, rpn, roi_heads: parts used instead of the ones the config would build. A custom
            backbone is any module with ``out_channels``; it may declare ``spatial_scales``, finest first, or they
            are measured once.
        box_head, box_outs, mask_head, mask_outs, keypoint_head, keypoint_outs: heads for the :class:`ROIHeads` built from the config (not
            together with ``roi_heads``).
        rpn_only: no RoI heads, the proposals are the detections (default ``MODEL.RPN_ONLY``).

    Attributes: ``preprocess``, ``Conv_Body``, ``RPN``, ``roi_heads`` (None when RPN-only), ``spatial_scales``,
    ``cfg``; properties ``Box_Head``, ``Box_Outs``, ``Mask_Head``, ``Mask_Outs``, ``Keypoint_Head``,
    ``Keypoint_Outs`` (``roi_heads``' heads).
    """

    def __init__(self, cfg=None, *, preprocess: Optional[Preprocessor] = None, conv_body: Optional[nn.Module] = None,
                 rpn: Optional[nn.Module] = None, roi_heads: Optional[ROIHeads] = None,
                 box_head: Optional[nn.Module] = None, box_outs: Optional[nn.Module] = None,
                 mask_head: Optional[nn.Module] = None, mask_outs: Optional[nn.Module] = None,
                 keypoint_head: Optional[nn.Module] = None, keypoint_outs: Optional[nn.Module] = None,
                 rpn_only: Optional[bool] = None):
        super().__init__()
        cfg = _validated(cfg)
        self.cfg = cfg
        rpn_only = bool(cfg.MODEL.RPN_ONLY) if rpn_only is None else bool(rpn_only)
        head_parts = {"box_head": box_head, "box_outs": box_outs, "mask_head": mask_head, "mask_outs": mask_outs,
                      "keypoint_head": keypoint_head, "keypoint_outs": keypoint_outs}
        given = sorted(k for k, v in head_parts.items() if v is not None)
        if given and (roi_heads is not None or rpn_only):
            raise ValueError(f"{', '.join(given)} given with " + ("roi_heads: pass the heads inside ROIHeads "
                             "instead" if roi_heads is not None else "an RPN-only model, which has no RoI heads"))
        if roi_heads is not None and rpn_only:
            raise ValueError("roi_heads given for an RPN-only model (rpn_only / MODEL.RPN_ONLY)")

        self.preprocess = preprocess if preprocess is not None else Preprocessor.from_cfg(cfg)
        self.Conv_Body = conv_body if conv_body is not None else build_conv_body(cfg)
        if not hasattr(self.Conv_Body, "out_channels"):
            raise ValueError("conv_body must have an integer attribute `out_channels`")
        in_channels = int(self.Conv_Body.out_channels)
        scales = getattr(self.Conv_Body, "spatial_scales", None)
        if scales is None:
            scales = infer_spatial_scales(self.Conv_Body)
        self.spatial_scales = list(scales)
        self.RPN = rpn if rpn is not None else RPN.from_cfg(cfg, in_channels, spatial_scales=self.spatial_scales)
        if roi_heads is None and not rpn_only:
            heads_cls = CascadeROIHeads if cfg.MODEL.CASCADE_ON else ROIHeads
            roi_heads = heads_cls.from_cfg(cfg, in_channels, self.spatial_scales, **head_parts)
        self.register_module("roi_heads", roi_heads)
        flatten_child_state_dict(self, "roi_heads")
        # Last, so that every module built above runs the config's kernels (a per-model choice, not global state).
        apply_ops_backend(self, cfg.OPS_BACKEND)

    @classmethod
    def from_cfg(cls, cfg, **parts) -> "Generalized_RCNN":
        """``Generalized_RCNN(cfg, **parts)``: every part not given is built from ``cfg``."""
        return cls(cfg, **parts)

    @classmethod
    def from_parts(cls, *, preprocess: Preprocessor, conv_body: nn.Module, rpn: nn.Module,
                   roi_heads: Optional[ROIHeads], cfg=None) -> "Generalized_RCNN":
        """A model of the given parts; nothing is built from a config.

        Args:
            preprocess: the :class:`Preprocessor` (sizes, pixel statistics).
            conv_body: the backbone (``out_channels``; ``spatial_scales`` or measured once).
            rpn: the :class:`~maskrcnn.modeling.rpn.rpn.RPN`.
            roi_heads: the :class:`ROIHeads`, or None for an RPN-only model.
            cfg: kept as ``model.cfg`` for the tools and the Detectron API (default ``get_cfg()``, not the global
                config).
        """
        return cls(get_cfg() if cfg is None else cfg, preprocess=preprocess, conv_body=conv_body, rpn=rpn,
                   roi_heads=roi_heads, rpn_only=roi_heads is None)

    # --- the heads under their Detectron names ------------------------------------------------------------------
    Box_Head = _roi_head_part("Box_Head")
    Box_Outs = _roi_head_part("Box_Outs")
    Mask_Head = _roi_head_part("Mask_Head")
    Mask_Outs = _roi_head_part("Mask_Outs")
    Keypoint_Head = _roi_head_part("Keypoint_Head")
    Keypoint_Outs = _roi_head_part("Keypoint_Outs")

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ registers modules without consulting properties: route the heads to roi_heads.
        if name in ROI_HEAD_PARTS:
            object.__setattr__(self, name, value)  # the property's setter
        else:
            super().__setattr__(name, value)

    @property
    def mask_on(self) -> bool:
        return self.roi_heads is not None and self.roi_heads.mask_on

    @property
    def keypoints_on(self) -> bool:
        return self.roi_heads is not None and self.roi_heads.keypoints_on

    @property
    def rpn_only(self) -> bool:
        return self.roi_heads is None

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets (list of dicts with boxes, labels, masks)")
        if self.training:
            _check_targets(targets, self.mask_on, self.keypoints_on)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.preprocess(images, targets)
        # Evaluation ignores targets, as Detectron does.
        targets = _split_crowd(targets) if self.training else None
        features = self.Conv_Body(image_list.tensors)
        proposals, losses = self.propose(features, image_list, targets)
        if self.roi_heads is None:
            results = [{"boxes": p, "scores": torch.ones_like(p[:, 0]),
                        "labels": torch.ones_like(p[:, 0], dtype=torch.int64)} for p in proposals]
        else:
            results, head_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
            losses = {**losses, **head_losses}
        if self.training:
            return losses
        return self.preprocess.postprocess(results, image_list.image_sizes, original_sizes)

    def propose(self, features, image_list: ImageList, targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """The RPN on ``features`` of the batch ``image_list``: per image ``(P_i, 4)`` proposals in network-input
        pixels, and the RPN losses in training (``targets`` with ``boxes`` and optional ``crowd_boxes``)."""
        proposals, losses = self.RPN(features, image_list.image_sizes, targets,
                                     batch_shape=tuple(image_list.tensors.shape[-2:]))
        return proposals, dict(losses)


def _check_targets(targets: List[Dict[str, Tensor]], mask_on: bool, keypoints_on: bool = False) -> None:
    for i, t in enumerate(targets):
        for key in ("boxes", "labels") + (("masks",) if mask_on else ()) + (("keypoints",) if keypoints_on else ()):
            if key not in t:
                raise ValueError(f"target {i} has no {key!r} (keys: {sorted(t)})")
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be (N, 4), got shape {tuple(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if boxes.numel() and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            bad = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).flatten().tolist()
            raise ValueError(f"target {i}: boxes {bad} have zero or negative width/height: {boxes[bad].tolist()}")


def _split_crowd(targets: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """Separate crowd regions (``crowd_boxes``: ignored, never trained as objects) from the instances
    (``boxes``, ``labels``, ``masks``)."""
    out = []
    for t in targets:
        is_crowd = t.get("iscrowd")
        if is_crowd is None:
            keep = torch.ones(t["boxes"].shape[0], dtype=torch.bool, device=t["boxes"].device)
        else:
            keep = is_crowd.to(t["boxes"].device) == 0
        split = {"boxes": t["boxes"][keep], "labels": t["labels"][keep], "crowd_boxes": t["boxes"][~keep]}
        for key in ("masks", "keypoints"):
            if key in t:
                split[key] = t[key][keep]
        out.append(split)
    return out
