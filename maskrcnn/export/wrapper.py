"""``ExportableMaskRCNN``: one image in, detections out, written so that tracing keeps every size dynamic.

The wrapper is built from a trained :class:`~maskrcnn.modeling.generalized_rcnn.Generalized_RCNN`'s own modules
(``preprocess`` settings, ``Conv_Body``, ``RPN.head``, and ``roi_heads``' ``Box_Head``, ``Box_Outs``, ``Mask_Head``,
``Mask_Outs`` and settings) and shares their parameters. It runs the same inference as the model, but

* pre-processing (uint8 -> [0, 1], channel order, normalisation, resize, padding to a multiple of 32) is inside;
* every size (resized image, padded batch, feature grids, anchor counts, top-k sizes) is computed from tensor
  shapes, so ``torch.jit.trace`` and the ONNX exporter record the arithmetic instead of the traced image's numbers;
* NMS and RoIAlign are torchvision's operators (``torch.ops.torchvision.nms`` / ``roi_align``), which TorchScript
  serialises and the ONNX exporter maps to ``NonMaxSuppression`` / ``RoiAlign``. Per-class NMS uses the
  coordinate-offset trick (one NMS over boxes shifted apart by class), where the model's own per-class NMS works
  on the original coordinates: decisions can differ only for IoUs within float32 rounding of the threshold.

Output, for one ``(3, H, W)`` RGB image: ``boxes (N, 4)`` float32 x1y1x2y2 in input-image pixels (torchvision's
continuous convention), ``labels (N,)`` int64 in 1..K, ``scores (N,)`` float32 (decreasing), and ``masks``: either
``(N, 1, M, M)`` float32 probabilities of each box's class (``M = MRCNN.RESOLUTION``; paste them with
:func:`maskrcnn.export.paste.paste_masks`, ``method=`` the model's ``TEST.MASK_PASTE_METHOD``, which
``ExportableMaskRCNN.mask_paste_method`` holds) or, with ``paste_masks=True``, ``(N, 1, H, W)`` probabilities pasted
by that method inside the graph.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._backend import torchvision_ops_available, use_backend
from ..ops.boxes import remove_small_boxes
from ..modeling.rpn.proposals import clip_boxes_to_size, generate_proposals
from .paste import paste_masks_dense

__all__ = ["ExportableMaskRCNN", "INPUT_DTYPES"]

#: Input dtypes an exported model can be built for: uint8 (0..255) or float32 (0..1) RGB.
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


def _shape_hw(x: Tensor) -> Tensor:
    """``(2,)`` int64 ``[H, W]`` of a ``(..., H, W)`` tensor: a traced value under ``torch.jit.trace`` (never a
    constant), built from the symbolic sizes under ``torch.export``."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(x)[-2:]
    return torch.tensor([x.shape[-2], x.shape[-1]], dtype=torch.int64, device=x.device)


def _check_exportable_rules(model: nn.Module) -> None:
    """The graph reproduces torchvision's pre/post-processing and proposal rules only: refuse a model configured
    for detectron2's (it would export a graph that computes differently from the model)."""
    pre, rpn = model.preprocess, model.RPN
    # TEST.MASK_PASTE_METHOD is not among them: both methods export (paste.paste_masks_dense).
    chosen = {"RESIZE_METHOD": getattr(pre, "resize_method", "torchvision"),
              "TEST.DETECTOR_POSTPROCESS": getattr(pre, "detector_postprocess", "torchvision")}
    bad = [f"{k} = {v!r}" for k, v in chosen.items() if v != "torchvision"]
    bad += [f"RPN.{k.upper()} = True" for k in ("min_size_strict", "nms_on_logits") if getattr(rpn, k, False)]
    if int(getattr(pre, "size_divisibility", 32)) < 1:
        bad.append(f"SIZE_DIVISIBILITY = {pre.size_divisibility}")
    if bad:
        raise NotImplementedError("exporting reproduces torchvision's pre/post-processing only; this model sets "
                                  + ", ".join(bad) + " (detectron2's rules): export it with those keys at their "
                                  "defaults, or run it in PyTorch")


class ExportableMaskRCNN(nn.Module):
    """Single-image Mask R-CNN inference with pre- and post-processing inside, for TorchScript / ONNX / export.

    Args:
        model: a ``Generalized_RCNN`` (FPN or C4 body, mask head optional) with trained weights; switched to
            eval mode. Its modules are shared, not copied.
        input_dtype: ``torch.uint8`` (RGB 0..255) or ``torch.float32`` (RGB in [0, 1]); the traced graph takes the
            dtype it was traced with.
        paste_masks: return masks pasted into the image ``(N, 1, H, W)`` instead of ``(N, 1, M, M)``.

    ``forward(image (3, H, W)) -> (boxes (N, 4), labels (N,), scores (N,), masks)`` (see the module docstring);
    a model without a mask head returns ``(boxes, labels, scores)``.
    """

    def __init__(self, model: nn.Module, input_dtype: torch.dtype = torch.uint8, paste_masks: bool = False):
        super().__init__()
        if input_dtype not in INPUT_DTYPES.values():
            raise ValueError(f"input_dtype must be torch.uint8 or torch.float32, got {input_dtype}")
        for name in ("preprocess", "Conv_Body", "RPN"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a Generalized_RCNN (it has no {name!r}); got {type(model).__name__}")
        if getattr(model, "rpn_only", False) or getattr(model, "roi_heads", None) is None:
            raise ValueError("an RPN-only model (MODEL.RPN_ONLY) has no detections to export")
        # Probed here, outside any tracer: the probe runs an op and caches its verdict.
        if not torchvision_ops_available():
            raise RuntimeError("exporting needs torchvision's compiled ops (torch.ops.torchvision.nms / roi_align), "
                               "which could not be loaded; install the torchvision build matching torch")
        _check_exportable_rules(model)
        model.eval()
        self.input_dtype = input_dtype
        self.paste_masks = bool(paste_masks)
        pre = model.preprocess
        self.min_size = float(pre.test_min_size)
        self.max_size = float(pre.test_max_size)
        self.size_divisibility = int(pre.size_divisibility)
        self.bgr = pre.pixel_order == "BGR"
        self.pixel_scale = float(pre.pixel_scale)
        self.mask_paste_padding = int(pre.mask_paste_padding)
        self.mask_paste_method = str(getattr(pre, "mask_paste_method", "torchvision"))
        self.register_buffer("pixel_mean", pre.pixel_mean.detach().clone().float().view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", pre.pixel_std.detach().clone().float().view(3, 1, 1), persistent=False)

        self.Conv_Body = model.Conv_Body
        rpn = model.RPN
        self.rpn_head = rpn.head
        gen = rpn.anchor_generator
        cells = list(gen.cell_anchors)
        for i, c in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", c.detach().clone().float(), persistent=False)
        self.num_levels = len(cells)
        self.anchor_strides: Optional[List[int]] = None if gen.strides is None else [int(s) for s in gen.strides]
        gp = rpn.RPN_GenerateProposals
        self.rpn_box_coder = rpn.box_coder
        self.rpn_pre_nms_top_n = int(gp.pre_nms_top_n["testing"])
        self.rpn_post_nms_top_n = int(gp.post_nms_top_n["testing"])
        self.rpn_nms_thresh = float(gp.nms_thresh["testing"])
        self.rpn_min_size = float(gp.min_size["testing"])
        self.rpn_score_thresh = float(rpn.score_thresh)

        heads = model.roi_heads
        if getattr(heads, "keypoints_on", False):
            # The exported graph has no keypoint branch yet: refuse rather than silently drop the keypoints.
            raise ValueError("export does not support Keypoint R-CNN (MODEL.KEYPOINTS_ON True) yet: the keypoint "
                             "branch is not in the exported graph; export a model with MODEL.KEYPOINTS_ON False")
        if hasattr(heads, "num_stages"):
            raise ValueError("export does not support Cascade R-CNN (MODEL.CASCADE_ON True) yet: the exported graph "
                             "has one box stage; run the model in PyTorch (Predictor, test_net) instead")
        self.Box_Head = heads.Box_Head
        self.Box_Outs = heads.Box_Outs
        self.mask_on = bool(heads.mask_on)
        if self.mask_on:
            self.Mask_Head = heads.Mask_Head
            self.Mask_Outs = heads.Mask_Outs
            self.mask_shares_res5 = bool(heads.shares_res5)
        self.box_coder = heads.box_coder
        self.legacy = bool(getattr(heads.box_coder, "legacy_plus_one", False))
        self.score_thresh = float(heads.score_thresh)
        self.nms_thresh = float(heads.nms_thresh)
        self.detections_per_img = int(heads.detections_per_img)
        self.min_box_size = float(heads.min_box_size)
        self.bbox_reg = bool(heads.bbox_reg)
        self.eval()

    def train(self, mode: bool = True) -> "ExportableMaskRCNN":
        """Always eval: the wrapper is inference only, and exporters that restore the caller's mode afterwards
        must not switch the shared model's BatchNorm layers to training."""
        return super().train(False)

    # --- pre-processing -----------------------------------------------------------------------------------------
    def preprocess(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        """``(3, H, W)`` image -> ``(1, 3, Hp, Wp)`` network input and ``(2,)`` int64 resized ``[h, w]``.

        The arithmetic is :class:`~maskrcnn.modeling.preprocess.Preprocessor`'s: normalise, then resize by
        ``min(min_size / short, max_size / long)`` (float64, the output size floored) with bilinear interpolation,
        then zero-pad at the bottom/right to a multiple of ``size_divisibility``.
        """
        x = image.float()
        if image.dtype == torch.uint8:
            x = x / 255.0
        if self.bgr:
            x = x.flip(0)
        if self.pixel_scale != 1.0:
            x = x * self.pixel_scale
        x = (x - self.pixel_mean) / self.pixel_std
        if torch.compiler.is_compiling():
            return self._resize_and_pad_symbolic(x)
        hw = _shape_hw(x)
        hw64 = hw.to(torch.float64)
        # float64 tensors, not Python scalars: exporters would turn the constants into float32 and the floored
        # size could then lose a pixel against the model's double-precision arithmetic.
        # (1,) tensors, not 0-d ones: the ONNX exporter demotes 0-d float64 arithmetic to float32.
        min_size = torch.tensor([self.min_size], dtype=torch.float64)
        max_size = torch.tensor([self.max_size], dtype=torch.float64)
        # Shorter/longer side reduced in int64: OpenVINO's ReduceMin/ReduceMax on float64 give wrong values.
        short = hw.amin(0, keepdim=True).to(torch.float64)
        long = hw.amax(0, keepdim=True).to(torch.float64)
        scale = torch.minimum(min_size / short, max_size / long)
        new_hw = torch.floor(hw64 * scale).to(torch.int64)
        x = F.interpolate(x[None], size=[new_hw[0], new_hw[1]], mode="bilinear", align_corners=False)
        d = self.size_divisibility
        padded = torch.div(new_hw + (d - 1), d, rounding_mode="floor") * d
        pad = padded - new_hw
        x = F.pad(x, [0, pad[1], 0, pad[0]])
        return x, new_hw

    def _resize_and_pad_symbolic(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        # torch.export: sizes as symbolic ints (sizes read back from tensors would be unbacked, data-dependent).
        h, w = x.shape[-2], x.shape[-1]
        short, long = torch.sym_min(h, w), torch.sym_max(h, w)
        scale = torch.sym_min(self.min_size / torch.sym_float(short), self.max_size / torch.sym_float(long))
        # sym_int truncates, which is floor for these positive sizes (math.floor does not serialise in a .pt2).
        new_h, new_w = torch.sym_int(h * scale), torch.sym_int(w * scale)
        x = F.interpolate(x[None], size=[new_h, new_w], mode="bilinear", align_corners=False)
        d = self.size_divisibility
        x = F.pad(x, [0, (new_w + d - 1) // d * d - new_w, 0, (new_h + d - 1) // d * d - new_h])
        return x, torch.tensor([new_h, new_w], dtype=torch.int64, device=x.device)

    # --- RPN ------------------------------------------------------------------------------------------------------
    def anchors(self, feats: List[Tensor], batch: Tensor) -> List[Tensor]:
        """Per level ``(H_l * W_l * A, 4)`` float32 anchors, as :class:`AnchorGenerator` computes them. Grid sizes
        are read from the shapes, which both tracers and ``torch.export`` keep symbolic."""
        out = []
        for level, f in enumerate(feats):
            grid_h, grid_w = f.shape[-2], f.shape[-1]
            if self.anchor_strides is not None:
                stride_y = stride_x = self.anchor_strides[level]
            else:  # torchvision's rule: the stride is the padded batch size over the grid size
                stride_y, stride_x = batch.shape[-2] // grid_h, batch.shape[-1] // grid_w
            xs = torch.arange(grid_w, dtype=torch.int64, device=f.device) * stride_x
            ys = torch.arange(grid_h, dtype=torch.int64, device=f.device) * stride_y
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=1).to(torch.float32)
            cell = getattr(self, f"cell_anchors_{level}")
            out.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return out

    def proposals(self, feats: List[Tensor], batch: Tensor, image_hw: Tensor) -> Tensor:
        """``(P, 4)`` RPN proposals of the single image (the model's ``generate_proposals``)."""
        objectness, deltas = self.rpn_head(feats)
        anchors = self.anchors(feats, batch)
        boxes, _ = generate_proposals(objectness, deltas, anchors, image_hw[None], self.rpn_pre_nms_top_n,
                                      self.rpn_post_nms_top_n, self.rpn_nms_thresh, self.rpn_min_size,
                                      self.rpn_box_coder, self.rpn_score_thresh)
        return boxes[0]

    # --- boxes ------------------------------------------------------------------------------------------------------
    def detections(self, cls_score: Tensor, bbox_pred: Tensor, proposals: Tensor, image_hw: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor]:
        """Softmax, per-class decode and clip, score threshold, size filter, per-class NMS, limit (the model's
        ``roi_heads.predict_boxes`` + ``postprocess_detections`` for one image). Boxes in resized-image pixels."""
        num_classes = cls_score.shape[1]
        if not self.bbox_reg:  # TEST.BBOX_REG off: every class's box is the RoI itself
            boxes = proposals.repeat(1, num_classes)
        elif bbox_pred.shape[1] != 4 * num_classes:  # class-agnostic regression (the last 4 columns)
            boxes = self.box_coder.decode(bbox_pred[:, -4:], proposals).repeat(1, num_classes)
        else:
            boxes = self.box_coder.decode(bbox_pred, proposals)
        scores = F.softmax(cls_score, dim=-1)
        boxes = clip_boxes_to_size(boxes.reshape(-1, 4), image_hw, self.legacy).reshape(-1, num_classes, 4)
        labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, self.min_box_size, legacy_plus_one=self.legacy)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms_offsets(boxes, scores, labels, self.nms_thresh, image_hw.max())[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def mask_probs(self, feats, boxes: Tensor, labels: Tensor) -> Tensor:
        """``(N, 1, M, M)`` mask probabilities of each box's label."""
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
        if self.mask_shares_res5:
            _, res5_map = self.Box_Head(feats, rois, return_res5=True)
            mask_feat = self.Mask_Head(res5_map)
        else:
            mask_feat = self.Mask_Head(feats, rois)
        logits = self.Mask_Outs(mask_feat)
        if logits.shape[1] > 1:  # class-specific masks: the channel of each box's label
            m = logits.shape[-1]
            logits = logits.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, m, m))
        return logits.sigmoid()

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(self, image: Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected one (3, H, W) RGB image, got shape {tuple(image.shape)}")
        if image.dtype != self.input_dtype:
            raise TypeError(f"this model was built for {self.input_dtype} images, got {image.dtype}")
        with use_backend("torchvision"):
            return self._forward(image)

    def _forward(self, image: Tensor):
        batch, image_hw = self.preprocess(image)
        feats = self.Conv_Body(batch)
        feat_list = [feats] if isinstance(feats, Tensor) else list(feats)
        proposals = self.proposals(feat_list, batch, image_hw)
        rois = torch.cat([proposals.new_zeros((proposals.shape[0], 1)), proposals], dim=1)
        box_feat = self.Box_Head(feats, rois)
        if isinstance(box_feat, tuple):
            box_feat = box_feat[0]
        cls_score, bbox_pred = self.Box_Outs(box_feat)
        boxes, scores, labels = self.detections(cls_score.float(), bbox_pred.float(), proposals, image_hw)
        # Back to input pixels: the per-axis ratio of the sizes, in float32 as Preprocessor.postprocess does.
        orig_hw = _shape_hw(image).to(torch.float32)
        ratio = orig_hw / image_hw.to(torch.float32)
        out_boxes = boxes * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0]))
        if not self.mask_on:
            return out_boxes, labels, scores
        masks = self.mask_probs(feats, boxes, labels).float()
        if self.paste_masks:
            masks = paste_masks_dense(masks, out_boxes, _shape_hw(image), self.mask_paste_padding,
                                      method=self.mask_paste_method)
        return out_boxes, labels, scores, masks


def batched_nms_offsets(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                        max_coordinate: Tensor) -> Tensor:
    """Per-class NMS as one ``torchvision::nms`` over boxes shifted apart by class (ONNX ``NonMaxSuppression``).

    ``boxes`` ``(N, 4)`` lie in ``[0, max_coordinate]`` (clipped to the image), ``idxs`` ``(N,)`` int classes.
    Returns int64 indices by decreasing score. The shift is ``class * (max_coordinate + 1)``, so boxes of
    different classes never overlap; IoUs are computed on the shifted float32 coordinates. The bound comes from
    the image size rather than ``boxes.max()`` so that a graph traced with detections also runs without any.
    """
    offsets = idxs.to(boxes) * (max_coordinate.to(boxes) + 1)
    return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, float(iou_threshold))
