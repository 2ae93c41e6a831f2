"""Test-time augmentation, Detectron's ``TEST.BBOX_AUG`` / ``TEST.MASK_AUG``, over the model's own methods.

One implementation for the three ways of running inference:

- ``test_net`` / :func:`~maskrcnn.engine.inference.evaluate_on_dataset` and :class:`~maskrcnn.Predictor` call
  :func:`with_test_time_augmentation` ``(model, cfg)``: the model itself when no augmentation is enabled, else a
  :class:`TestTimeAugmentation` module with the model's eval contract (``images -> [{boxes, scores, labels,
  masks}]``);
- ``core.test.im_detect_all`` (Detectron's API) calls :meth:`TestTimeAugmentation.detect_boxes` and
  :meth:`TestTimeAugmentation.detect_masks` (its ``im_detect_bbox_aug`` / ``im_detect_mask_aug``).

Each augmentation (:class:`Augmentation`) is a run of the model on a transformed batch: optionally the width
multiplied by an aspect ratio, optionally flipped horizontally, then the model's own ``preprocess`` at a given
scale, ``Conv_Body``, ``propose`` (or given proposals mapped into the run), ``roi_heads.predict_boxes`` and
``roi_heads.mask_probs``. Predictions are mapped back into the *reference frame*, the network input of the plain
run (``TEST.SCALE`` / ``TEST.MAX_SIZE``, no flip), merged (:mod:`maskrcnn.engine.tta_merge`) and selected by
``roi_heads.postprocess_detections`` (score threshold, NMS, box voting, limit) exactly as the plain path does, so
that with no augmentation the result is the plain one bit for bit. Runs are made in Detectron's order: for boxes
the flip, each scale (and its flip), each aspect ratio (and its flip), the plain run last (the order of ``UNION``
candidates, hence of NMS ties); for masks the plain run first.

Mapping between frames is exact for a flip at the same scale (``x -> W - x``, Detectron's ``W - 1 - x`` with
``MODEL.LEGACY_PLUS_ONE``) and a per-axis ratio of the two network-input sizes otherwise (the sizes of the same
image, so both span it). Flipped masks are flipped back along their ``M`` columns.

The keypoint branch (``TEST.KPS_AUG``, Detectron's ``im_detect_keypoints_aug``) works as the mask branch: the
heatmap logits of the final boxes on the plain run (first) and on each augmentation, flipped heatmaps mirrored back
with left and right keypoints swapped (``keypoint_flip``, from ``KRCNN.KEYPOINT_NAMES``), merged per cell
(``HM_AVG`` / ``HM_MAX``), then placed by the model's own arg-max (``heatmaps_to_keypoints``) on the reference
boxes. A keypoint model run with only box or mask augmentation gets its keypoints from the plain run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..modeling.preprocess import ImageList, resize_boxes
from ..modeling.roi_heads.keypoint_outputs import heatmaps_to_keypoints
from ..ops import _backend
from ..data.transforms import keypoint_flip_indices
from ..ops.boxes import flip_boxes
from .amp import AMP_DTYPES
from .tta_merge import (BOX_HEURISTICS, KPS_HEURISTICS, MASK_HEURISTICS, merge_box_predictions,
                        merge_keypoint_heatmaps, merge_mask_probs)

__all__ = ["Augmentation", "ReferenceRun", "TestTimeAugmentation", "detectron_augmentations",
           "with_test_time_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """One run of the model: the image's width times ``aspect_ratio``, flipped when ``hflip``, then resized so that
    its shorter side is ``scale`` (longer side at most ``max_size``) by the model's preprocessing."""

    scale: int
    max_size: int
    hflip: bool = False
    aspect_ratio: float = 1.0

    def __post_init__(self):
        if int(self.scale) <= 0 or int(self.max_size) <= 0 or not float(self.aspect_ratio) > 0:
            raise ValueError(f"an augmentation needs a positive scale, max_size and aspect ratio, got {self}")

    def describe(self) -> str:
        """``"208x736"``, ``"208x736 flipped"``, ``"... width x0.8"``: shorter side x longest side, and the rest."""
        text = f"{int(self.scale)}x{int(self.max_size)}"
        if self.aspect_ratio != 1.0:
            text += f" width x{float(self.aspect_ratio):g}"
        return text + (" flipped" if self.hflip else "")

    def apply(self, image: Tensor) -> Tensor:
        """The transformed ``(3, H, W')`` image (before the model's resizing); ``W' = round(W * aspect_ratio)``."""
        if self.aspect_ratio != 1.0:
            h, w = image.shape[-2:]
            new_w = max(1, int(round(float(w) * float(self.aspect_ratio))))
            image = F.interpolate(image[None], size=(int(h), new_w), mode="bilinear", align_corners=False)[0]
        return image.flip(-1) if self.hflip else image


def detectron_augmentations(scale: int, max_size: int, *, h_flip: bool = False, scales: Sequence[int] = (),
                             scales_max_size: int = 4000, scale_h_flip: bool = False,
                             aspect_ratios: Sequence[float] = (), aspect_ratio_h_flip: bool = False
                             ) -> List[Augmentation]:
    """The extra runs one of Detectron's augmentation sections asks for (``TEST.BBOX_AUG``, ``TEST.MASK_AUG``, and
    ``TEST.KPS_AUG`` alike: ``H_FLIP``, ``SCALES``, ``MAX_SIZE``, ``SCALE_H_FLIP``, ``ASPECT_RATIOS``,
    ``ASPECT_RATIO_H_FLIP``), in Detectron's order, without the plain run at ``scale`` / ``max_size``: the flip;
    each of ``scales`` at ``scales_max_size`` (then flipped with ``scale_h_flip``); each of ``aspect_ratios`` at
    ``scale`` / ``max_size`` (then flipped with ``aspect_ratio_h_flip``)."""
    out = [Augmentation(scale, max_size, hflip=True)] if h_flip else []
    for s in scales:
        out.append(Augmentation(int(s), int(scales_max_size)))
        if scale_h_flip:
            out.append(Augmentation(int(s), int(scales_max_size), hflip=True))
    for ar in aspect_ratios:
        out.append(Augmentation(scale, max_size, aspect_ratio=float(ar)))
        if aspect_ratio_h_flip:
            out.append(Augmentation(scale, max_size, hflip=True, aspect_ratio=float(ar)))
    return out


@dataclass
class ReferenceRun:
    """The plain run of a batch, whose network input is the frame every augmentation is mapped into.

    Attributes: ``image_list`` (the preprocessed batch, ``image_sizes`` the reference sizes), ``features`` (its
    ``Conv_Body`` output, reused by the mask stage), ``original_sizes`` (``(h, w)`` of the images as given)."""

    image_list: ImageList
    features: object
    original_sizes: List[Tuple[int, int]]


class TestTimeAugmentation(nn.Module):
    """A detector that runs ``model`` on several augmentations of each image and merges the predictions.

    Args:
        model: a :class:`~maskrcnn.modeling.generalized_rcnn.Generalized_RCNN` with RoI heads (eval mode).
        bbox_augmentations: extra runs of the box stage (:func:`detectron_augmentations` of ``TEST.BBOX_AUG``).
        mask_augmentations: extra runs of the mask stage (of ``TEST.MASK_AUG``).
        score_heur, coord_heur: ``TEST.BBOX_AUG.SCORE_HEUR`` / ``COORD_HEUR`` (``UNION``, ``AVG``, ``ID``).
        mask_heur: ``TEST.MASK_AUG.HEUR`` (``SOFT_AVG``, ``SOFT_MAX``, ``LOGIT_AVG``).
        keypoint_augmentations: extra runs of the keypoint stage (of ``TEST.KPS_AUG``).
        kps_heur: ``TEST.KPS_AUG.HEUR`` (``HM_AVG``, ``HM_MAX``).
        keypoint_flip: ``(K,)`` int64, the index of each keypoint's mirror image
            (:func:`~maskrcnn.data.transforms.keypoint_flip_indices` of ``KRCNN.KEYPOINT_NAMES``); needed when a
            keypoint augmentation flips.
        reference: ``(scale, max_size)`` of the plain run; default the model's test size (``TEST.SCALE``,
            ``TEST.MAX_SIZE``).
        amp: ``''``, ``'bf16'`` or ``'fp16'``: :meth:`forward` runs under that autocast, as a model prepared with
            ``TEST.AMP`` runs its own forward (the fp32 islands are the model's hooks).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, model: nn.Module, bbox_augmentations: Sequence[Augmentation] = (),
                 mask_augmentations: Sequence[Augmentation] = (), *, score_heur: str = "UNION",
                 coord_heur: str = "UNION", mask_heur: str = "SOFT_AVG",
                 reference: Optional[Tuple[int, int]] = None, amp: str = "",
                 keypoint_augmentations: Sequence[Augmentation] = (), kps_heur: str = "HM_AVG",
                 keypoint_flip: Optional[Tensor] = None):
        super().__init__()
        if getattr(model, "roi_heads", None) is None:
            raise ValueError("test-time augmentation needs a model with RoI heads (not MODEL.RPN_ONLY)")
        if score_heur not in BOX_HEURISTICS or coord_heur not in BOX_HEURISTICS:
            raise ValueError(f"score_heur / coord_heur must be in {BOX_HEURISTICS}, got {score_heur!r}, {coord_heur!r}")
        if (score_heur == "UNION") != (coord_heur == "UNION"):
            raise ValueError(f"TEST.BBOX_AUG.SCORE_HEUR = {score_heur!r} with COORD_HEUR = {coord_heur!r}: set both "
                             f"to 'UNION' or neither (Detectron's rule)")
        if mask_heur not in MASK_HEURISTICS:
            raise ValueError(f"mask_heur must be one of {MASK_HEURISTICS}, got {mask_heur!r}")
        if mask_augmentations and not model.mask_on:
            raise ValueError("mask augmentations given for a model without a mask head (MODEL.MASK_ON False)")
        keypoints_on = bool(getattr(model.roi_heads, "keypoints_on", False))
        if keypoint_augmentations and not keypoints_on:
            raise ValueError("keypoint augmentations given for a model without a keypoint head "
                             "(MODEL.KEYPOINTS_ON False)")
        if kps_heur not in KPS_HEURISTICS:
            raise ValueError(f"kps_heur must be one of {KPS_HEURISTICS}, got {kps_heur!r}")
        if any(a.hflip for a in keypoint_augmentations):
            num_kps = int(model.roi_heads.Keypoint_Outs.num_keypoints)
            if keypoint_flip is None or tuple(keypoint_flip.shape) != (num_kps,):
                got = None if keypoint_flip is None else tuple(keypoint_flip.shape)
                raise ValueError(f"a flipped keypoint augmentation needs keypoint_flip, the ({num_kps},) indices of "
                                 f"each keypoint's mirror (KRCNN.KEYPOINT_NAMES), got {got}")
        if amp and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be '' or one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.model = model
        pre = model.preprocess
        scale, max_size = reference if reference is not None else (pre.test_min_size, pre.test_max_size)
        self.reference = Augmentation(int(scale), int(max_size))
        self.bbox_augmentations = list(bbox_augmentations)
        self.mask_augmentations = list(mask_augmentations)
        self.score_heur, self.coord_heur, self.mask_heur = score_heur, coord_heur, mask_heur
        self.keypoint_augmentations = list(keypoint_augmentations)
        self.kps_heur = kps_heur
        self.keypoint_flip = None if keypoint_flip is None else torch.as_tensor(keypoint_flip, dtype=torch.int64)
        self.amp = amp
        self.training = model.training  # the wrapped model's mode (train()/eval() set both from now on)

    @classmethod
    def from_cfg(cls, model: nn.Module, cfg=None, *, amp: Optional[str] = None) -> "TestTimeAugmentation":
        """Settings from ``cfg`` (default ``model.cfg``): ``TEST.{SCALE, MAX_SIZE, AMP}``, ``TEST.BBOX_AUG.*``,
        ``TEST.MASK_AUG.*``, ``TEST.KPS_AUG.*`` (with ``KRCNN.KEYPOINT_NAMES``); ``amp`` overrides ``TEST.AMP``
        (the Detectron API passes ``''``: its caller owns the autocast region, as for the plain path)."""
        cfg = cfg if cfg is not None else model.cfg
        scale, max_size = int(cfg.TEST.SCALE), int(cfg.TEST.MAX_SIZE)
        box, mask = cfg.TEST.BBOX_AUG, cfg.TEST.MASK_AUG
        box_augs = detectron_augmentations(
            scale, max_size, h_flip=box.H_FLIP, scales=box.SCALES, scales_max_size=box.MAX_SIZE,
            scale_h_flip=box.SCALE_H_FLIP, aspect_ratios=box.ASPECT_RATIOS,
            aspect_ratio_h_flip=box.ASPECT_RATIO_H_FLIP) if box.ENABLED else []
        mask_augs = detectron_augmentations(
            scale, max_size, h_flip=mask.H_FLIP, scales=mask.SCALES, scales_max_size=mask.MAX_SIZE,
            scale_h_flip=mask.SCALE_H_FLIP, aspect_ratios=mask.ASPECT_RATIOS,
            aspect_ratio_h_flip=mask.ASPECT_RATIO_H_FLIP) if mask.ENABLED else []
        kps = cfg.TEST.KPS_AUG
        kps_augs = detectron_augmentations(
            scale, max_size, h_flip=kps.H_FLIP, scales=kps.SCALES, scales_max_size=kps.MAX_SIZE,
            scale_h_flip=kps.SCALE_H_FLIP, aspect_ratios=kps.ASPECT_RATIOS,
            aspect_ratio_h_flip=kps.ASPECT_RATIO_H_FLIP) if kps.ENABLED else []
        flip = None
        if any(a.hflip for a in kps_augs):
            names = list(cfg.KRCNN.KEYPOINT_NAMES)
            if len(names) != int(cfg.KRCNN.NUM_KEYPOINTS):
                raise ConfigError(f"TEST.KPS_AUG flips the image but KRCNN.KEYPOINT_NAMES has {len(names)} names for "
                                  f"KRCNN.NUM_KEYPOINTS = {cfg.KRCNN.NUM_KEYPOINTS}; set KRCNN.KEYPOINT_NAMES to the "
                                  f"dataset's keypoint names")
            flip = keypoint_flip_indices(names)
        return cls(model, box_augs, mask_augs,
                   score_heur=box.SCORE_HEUR if box.ENABLED else "UNION",
                   coord_heur=box.COORD_HEUR if box.ENABLED else "UNION", mask_heur=mask.HEUR,
                   reference=(scale, max_size), amp=str(cfg.TEST.AMP) if amp is None else amp,
                   keypoint_augmentations=kps_augs, kps_heur=kps.HEUR, keypoint_flip=flip)

    def check_proposals(self, given: bool) -> None:
        """Detectron's rule: with RPN proposals (``given=False``) the runs' RoIs differ, so only ``UNION`` can merge
        them. Raises :class:`~maskrcnn.config.ConfigError` naming the keys."""
        if not given and self.score_heur != "UNION":
            raise ConfigError(f"TEST.BBOX_AUG.SCORE_HEUR = {self.score_heur!r} / COORD_HEUR = {self.coord_heur!r} "
                              f"merge the augmentations RoI by RoI, but the RPN proposes different RoIs in each: "
                              f"use 'UNION' (Detectron's rule), or give the proposals "
                              f"(core.test.im_detect_all(box_proposals=...))")

    # --- frames ---------------------------------------------------------------------------------------------------
    def _legacy(self) -> bool:
        return bool(getattr(self.model.roi_heads.box_coder, "legacy_plus_one", False))

    def _to_reference(self, boxes: Tensor, aug: Augmentation, size: Tuple[int, int], ref_size: Tuple[int, int]
                      ) -> Tensor:
        """``(R, 4k)`` boxes of run ``aug`` (network input of ``size``) -> the reference frame (``ref_size``)."""
        if aug.hflip:
            boxes = flip_boxes(boxes, size[1], self._legacy())
        if tuple(size) != tuple(ref_size):
            boxes = resize_boxes(boxes.reshape(-1, 4), size, ref_size).reshape(boxes.shape)
        return boxes

    def _from_reference(self, boxes: Tensor, aug: Augmentation, ref_size: Tuple[int, int], size: Tuple[int, int]
                        ) -> Tensor:
        """The inverse of :meth:`_to_reference`: ``(N, 4)`` reference-frame boxes into run ``aug``."""
        if tuple(size) != tuple(ref_size):
            boxes = resize_boxes(boxes, ref_size, size)
        return flip_boxes(boxes, size[1], self._legacy()) if aug.hflip else boxes

    def _from_original(self, boxes: Tensor, aug: Augmentation, original: Tuple[int, int], size: Tuple[int, int]
                       ) -> Tensor:
        """``(P, 4)`` boxes in original-image pixels (given proposals) into run ``aug``."""
        boxes = resize_boxes(boxes, original, size)
        return flip_boxes(boxes, size[1], self._legacy()) if aug.hflip else boxes

    # --- runs -----------------------------------------------------------------------------------------------------
    def run_backbone(self, images: Sequence[Tensor], aug: Augmentation):
        image_list, _ = self.model.preprocess([aug.apply(im) for im in images], min_size=aug.scale,
                                              max_size=aug.max_size)
        return image_list, self.model.Conv_Body(image_list.tensors)

    def _box_run(self, images: Sequence[Tensor], aug: Augmentation, proposals: Optional[Sequence[Tensor]],
                 original_sizes: Sequence[Tuple[int, int]]):
        image_list, features = self.run_backbone(images, aug)
        if proposals is None:
            rois, _ = self.model.propose(features, image_list)
        else:
            rois = [self._from_original(p, aug, o, s)
                    for p, o, s in zip(proposals, original_sizes, image_list.image_sizes)]
        probs, boxes = self.model.roi_heads.predict_boxes(features, rois, image_list.image_sizes)
        return image_list, features, probs, boxes

    def detect_boxes(self, images: Sequence[Tensor], proposals: Optional[Sequence[Tensor]] = None
                     ) -> Tuple[List[Tensor], List[Tensor], ReferenceRun]:
        """Detectron's ``im_detect_bbox_aug`` for a batch: every run's class probabilities and per-class boxes,
        mapped into the reference frame and merged per image (before NMS).

        Args:
            images: ``(3, H_i, W_i)`` float RGB in ``[0, 1]``.
            proposals: per image ``(P_i, 4)`` RoIs in original-image pixels, or None for the model's RPN.

        Returns:
            ``(probs, boxes, reference)``: per image ``(R_i, K+1)`` and ``(R_i, 4(K+1))`` in the reference frame
            (the plain run's network input, ``reference.image_list.image_sizes[i]``), and the plain run.
        """
        self.check_proposals(given=proposals is not None)
        images = list(images)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        # The plain run first (its sizes are the reference), although its predictions go last (Detectron's order).
        ref_list, ref_features, ref_probs, ref_boxes = self._box_run(images, self.reference, proposals,
                                                                     original_sizes)
        ref_sizes = ref_list.image_sizes
        scores_ts: List[List[Tensor]] = [[] for _ in images]
        boxes_ts: List[List[Tensor]] = [[] for _ in images]
        for aug in self.bbox_augmentations:
            image_list, _, probs, boxes = self._box_run(images, aug, proposals, original_sizes)
            for i in range(len(images)):
                scores_ts[i].append(probs[i])
                boxes_ts[i].append(self._to_reference(boxes[i], aug, image_list.image_sizes[i], ref_sizes[i]))
        merged_probs, merged_boxes = [], []
        for i in range(len(images)):
            p, b = merge_box_predictions(scores_ts[i] + [ref_probs[i]], boxes_ts[i] + [ref_boxes[i]],
                                         identity_index=-1, score_heur=self.score_heur, coord_heur=self.coord_heur)
            merged_probs.append(p)
            merged_boxes.append(b)
        return merged_probs, merged_boxes, ReferenceRun(ref_list, ref_features, original_sizes)

    def _per_box_outputs(self, images: Sequence[Tensor], reference: ReferenceRun, boxes: Sequence[Tensor],
                         augmentations: Sequence[Augmentation],
                         head: Callable[[object, List[Tensor]], List[Tensor]],
                         unflip: Callable[[Tensor], Tensor]) -> List[List[Tensor]]:
        """``head(features, boxes_in_run)`` of the plain run and of every augmentation, for the reference-frame
        ``boxes``; returns per image the list of outputs (plain run first), flipped runs passed through ``unflip``."""
        ref_sizes = reference.image_list.image_sizes
        outputs = [[o] for o in head(reference.features, list(boxes))]
        if sum(int(b.shape[0]) for b in boxes) == 0:
            return outputs
        for aug in augmentations:
            image_list, features = self.run_backbone(images, aug)
            rois = [self._from_reference(b, aug, r, s) for b, r, s in zip(boxes, ref_sizes, image_list.image_sizes)]
            for i, out in enumerate(head(features, rois)):
                outputs[i].append(unflip(out) if aug.hflip else out)
        return outputs

    def detect_masks(self, images: Sequence[Tensor], reference: ReferenceRun, boxes: Sequence[Tensor],
                     labels: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """Detectron's ``im_detect_mask_aug`` for a batch: mask probabilities of the reference-frame ``boxes``
        (per image ``(N_i, 4)``) on the plain run and every mask augmentation, merged with ``TEST.MASK_AUG.HEUR``.

        Returns per image ``(N_i, 1, M, M)`` (the probability of each box's ``labels`` class) or, with
        ``labels=None``, ``(N_i, C, M, M)`` for every class (``C = K + 1``, or 1 for class-agnostic masks).
        """
        roi_heads = self.model.roi_heads
        labels = list(labels) if labels is not None else None

        def head(features, rois: List[Tensor]) -> List[Tensor]:
            return roi_heads.mask_probs(features, rois, labels)

        outputs = self._per_box_outputs(images, reference, boxes, self.mask_augmentations, head,
                                        unflip=lambda m: m.flip(-1))
        if not self.mask_augmentations:
            return [o[0] for o in outputs]
        return [merge_mask_probs(o, self.mask_heur) for o in outputs]

    def keypoint_heatmaps(self, images: Sequence[Tensor], reference: ReferenceRun, boxes: Sequence[Tensor]
                          ) -> List[Tensor]:
        """Detectron's ``im_detect_keypoints_aug`` for a batch: float32 heatmap logits ``(N_i, K, H, H)`` of the
        reference-frame ``boxes`` (per image ``(N_i, 4)``) on the plain run and every keypoint augmentation
        (flipped maps mirrored back, left and right swapped), merged with ``TEST.KPS_AUG.HEUR``."""
        roi_heads = self.model.roi_heads

        def head(features, rois: List[Tensor]) -> List[Tensor]:
            logits = roi_heads.Keypoint_Outs(roi_heads.Keypoint_Head(features, rois))
            return list(logits.float().split([int(r.shape[0]) for r in rois]))

        def unflip(maps: Tensor) -> Tensor:
            # Mirror the cells back, then take each keypoint's map from its mirror image's channel.
            return maps.flip(-1)[:, self.keypoint_flip.to(maps.device)]

        outputs = self._per_box_outputs(images, reference, boxes, self.keypoint_augmentations, head, unflip)
        return [merge_keypoint_heatmaps(maps, self.kps_heur) if len(maps) > 1 else maps[0] for maps in outputs]

    def detect_keypoints(self, images: Sequence[Tensor], reference: ReferenceRun, boxes: Sequence[Tensor]
                         ) -> Tuple[List[Tensor], List[Tensor]]:
        """:meth:`keypoint_heatmaps` placed on ``boxes`` by the model's arg-max (``heatmaps_to_keypoints``).

        Returns:
            per image ``(N_i, K, 3)`` float ``(x, y, 1)`` in reference-frame pixels and ``(N_i, K)`` scores (the
            merged heatmap logits at the chosen cells), as ``roi_heads.keypoints``.
        """
        keypoints, scores = [], []
        for merged, b in zip(self.keypoint_heatmaps(images, reference, boxes), boxes):
            if b.shape[0] == 0:
                k = merged.shape[1]
                keypoints.append(torch.zeros((0, k, 3), device=b.device))
                scores.append(torch.zeros((0, k), device=b.device))
                continue
            kp, sc = heatmaps_to_keypoints(merged, b)
            keypoints.append(kp)
            scores.append(sc)
        return keypoints, scores

    # --- the model's eval contract -------------------------------------------------------------------------------
    def _regions(self):
        stack = contextlib.ExitStack()
        backend = getattr(self.model, "ops_backend", "auto")
        if backend != "auto":
            # The plain path enters the model's kernel scope through its modules' hooks; NMS here is no module.
            stack.enter_context(_backend.scoped_backend(backend))
        if self.amp:
            device_type = self.model.preprocess.pixel_mean.device.type
            stack.enter_context(torch.autocast(device_type, dtype=AMP_DTYPES[self.amp]))
        return stack

    def forward(self, images: List[Tensor]) -> List[Dict[str, Tensor]]:
        """Detections of ``images`` (list of ``(3, H, W)`` float RGB in ``[0, 1]``) as ``model(images)`` returns
        them in eval mode: per image ``{boxes (D, 4) input pixels, scores, labels[, masks (D, 1, H, W)]}``."""
        if self.training:
            raise RuntimeError("TestTimeAugmentation is for inference: call .eval() first")
        if isinstance(images, Tensor):
            images = list(images) if images.dim() == 4 else [images]
        with self._regions():
            probs, boxes, ref = self.detect_boxes(images)
            det_boxes, det_scores, det_labels = self.model.roi_heads.postprocess_detections(probs, boxes)
            results = [{"boxes": b, "scores": s, "labels": lab}
                       for b, s, lab in zip(det_boxes, det_scores, det_labels)]
            if self.model.mask_on:
                for r, m in zip(results, self.detect_masks(images, ref, det_boxes, det_labels)):
                    r["masks"] = m
            if getattr(self.model.roi_heads, "keypoints_on", False):
                for r, kp, ks in zip(results, *self.detect_keypoints(images, ref, det_boxes)):
                    r["keypoints"], r["keypoints_scores"] = kp, ks
            return self.model.preprocess.postprocess(results, ref.image_list.image_sizes, ref.original_sizes)


def with_test_time_augmentation(model: nn.Module, cfg=None) -> nn.Module:
    """``model`` itself when ``cfg`` (default ``model.cfg``) enables neither ``TEST.BBOX_AUG`` nor
    ``TEST.MASK_AUG`` nor ``TEST.KPS_AUG``, else a :class:`TestTimeAugmentation` of it (checked now: RPN
    proposals need ``UNION``)."""
    cfg = cfg if cfg is not None else model.cfg
    if not (cfg.TEST.BBOX_AUG.ENABLED or cfg.TEST.MASK_AUG.ENABLED or cfg.TEST.KPS_AUG.ENABLED):
        return model
    tta = TestTimeAugmentation.from_cfg(model, cfg)
    tta.check_proposals(given=False)
    return tta
