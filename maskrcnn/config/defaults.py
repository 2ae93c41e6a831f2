"""Every config key, its default, and one line of documentation.

Section and key names follow Detectron (``MODEL``, ``RESNETS``, ``FPN``, ``RPN``, ``FAST_RCNN``, ``MRCNN``,
``TRAIN``, ``TEST``, ``SOLVER``, ...). Keys are declared through :func:`_key` so that each one carries its doc
line; ``docs/config.md`` is generated from :data:`KEY_DOCS` (``python -m maskrcnn.config.docs``) and a test keeps
the two equal.

Defaults describe Detectron's R-50-C4 Mask R-CNN at Detectron's default scale, except the loss rules
(``RPN.LOSS_NORMALIZATION``, ``FAST_RCNN.SMOOTH_L1_BETA``), which default to torchvision's as this package always
trained; ``configs/baselines/`` set Detectron's. Files in ``configs/`` override the defaults.
"""
from __future__ import annotations

from typing import Any, Dict

from yacs.config import CfgNode as CN

_C = CN()
_C.set_new_allowed(False)

#: Full dotted key -> one-line documentation.
KEY_DOCS: Dict[str, str] = {}
#: Section name -> one-line documentation.
SECTION_DOCS: Dict[str, str] = {}


def _section(name: str, doc: str) -> None:
    """Declare a section; a dotted name (``TEST.BBOX_AUG``) is a sub-section of an existing one."""
    node = _C
    parts = name.split(".")
    for p in parts[:-1]:
        node = getattr(node, p)
    setattr(node, parts[-1], CN())
    SECTION_DOCS[name] = doc


def _key(dotted: str, value: Any, doc: str) -> None:
    node = _C
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = getattr(node, p)
    setattr(node, parts[-1], value)
    KEY_DOCS[dotted] = doc


# ---------------------------------------------------------------------------------------------------------------------
_key("OUTPUT_DIR", "output", "Directory where checkpoints, logs and results are written.")
_key("RNG_SEED", 3, "Seed for Python, NumPy and PyTorch random number generators.")
_key("NUM_GPUS", 1, "Number of GPUs (processes) the config's batch sizes and schedule were tuned for.")
_key("DATA_DIR", "datasets", "Root folder under which catalog datasets (e.g. coco_2017_train) are looked up.")
_key("PIXEL_MEANS", [102.9801, 115.9465, 122.7717],
     "Per-channel means subtracted from the input, in PIXEL_ORDER and PIXEL_SCALE units.")
_key("PIXEL_STDS", [1.0, 1.0, 1.0], "Per-channel standard deviations the input is divided by (after the mean).")
_key("PIXEL_ORDER", "BGR", "Channel order the network expects: 'BGR' (Detectron, Caffe2 weights) or 'RGB' (torchvision).")
_key("PIXEL_SCALE", 255.0, "Value range of the network input: 255.0 for 0..255 pixels (Detectron) or 1.0 for 0..1 (torchvision).")
_key("RESIZE_METHOD", "torchvision",
     "How images are resized to the TRAIN/TEST scale: 'torchvision' (normalise, then float bilinear without "
     "antialiasing, size floor(side x scale)) or 'detectron2' (ResizeShortestEdge: size int(side x scale + 0.5), "
     "PIL's antialiased bilinear on the 0..255 image rounded to uint8, then normalise).")
_key("SIZE_DIVISIBILITY", 32, "The padded batch's height and width are multiples of this (32: torchvision, and "
     "Detectron/detectron2 FPN models; 0: padded to the largest image only, as detectron2's C4 models).")
_key("OPS_BACKEND", "auto",
     "Kernels a model built from this config runs for nms/roi_align/roi_pool: 'native' (pure PyTorch), "
     "'torchvision' (torchvision's compiled kernels) or 'auto' (defer to the MASKRCNN_OPS_BACKEND environment "
     "variable, else nms from torchvision's kernel and roi_align/roi_pool native; see maskrcnn/ops/_backend.py).")
_key("TUNE_MALLOC", True,
     "tools/train_net.py and tools/test_net.py make glibc malloc serve every block from the heap (M_MMAP_MAX 0) "
     "and never return the heap's top (maskrcnn/utils/malloc.py) at start: each step's tensors reuse the memory "
     "the previous step freed instead of fresh pages the kernel faults in and zeroes (5-15% of a small model's "
     "training step on a CPU, 0.6-2 s of a 7-9 s R-50-FPN step at 800 px; docs/benchmarks.md, 'Allocator'); "
     "the process keeps its peak memory. No effect where malloc is not glibc's.")
_key("FLUSH_DENORMAL", True,
     "tools/train_net.py and tools/test_net.py flush float denormals (|x| < 1.2e-38) to zero on the CPU at start "
     "(torch.set_flush_denormal; maskrcnn/utils/denormal.py): as gradients shrink, denormal arithmetic made an "
     "fp32 R-50-FPN training step 4x slower within five steps (docs/benchmarks.md, 'Denormals'). Changes a "
     "result only where a value was already below float32's normal range.")
_key("EPS", 1e-14, "Detectron's numerical-stability constant; kept so Detectron files load, nothing reads it "
     "(a non-default value logs a warning).")
_key("VIS_TH", 0.9, "Score threshold for drawing detections in visualisations.")

_section("MODEL", "Model composition.")
_key("MODEL.TYPE", "generalized_rcnn", "Model family; only 'generalized_rcnn' exists.")
_key("MODEL.CONV_BODY", "ResNet.ResNet50_conv4_body",
     "Backbone: 'ResNet.ResNet{18,34,50,101,152}_conv{4,5}_body' or 'FPN.fpn_ResNet{18,34,50,101,152}_conv5_body'.")
_key("MODEL.NUM_CLASSES", 81, "Number of classes including the background (COCO: 81).")
_key("MODEL.CLS_AGNOSTIC_BBOX_REG", False, "Predict one box per RoI instead of one per class.")
_key("MODEL.BBOX_REG_WEIGHTS", [10.0, 10.0, 5.0, 5.0], "Weights (wx, wy, ww, wh) of the Fast R-CNN box coder.")
_key("MODEL.FASTER_RCNN", True, "End-to-end Faster/Mask R-CNN on RPN proposals; must stay True (False, Fast "
     "R-CNN on precomputed proposals, is not supported and is rejected).")
_key("MODEL.MASK_ON", True, "Add the mask branch.")
_key("MODEL.KEYPOINTS_ON", False, "Add the keypoint branch (Keypoint R-CNN; KRCNN.* keys).")
_key("MODEL.CASCADE_ON", False, "Cascade R-CNN box stages (CASCADE_RCNN.* keys; detectron2's CascadeROIHeads): needs "
     "an FPN box head and MODEL.CLS_AGNOSTIC_BBOX_REG True.")
_key("MODEL.RPN_ONLY", False, "Stop after the RPN (proposals are the output).")
_key("MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", False, "Initialise the backbone from RESNETS.IMAGENET_PRETRAINED_WEIGHTS.")
_key("MODEL.LEGACY_PLUS_ONE", False,
     "Detectron's box convention (width = x2 - x1 + 1) for anchors, box coding and clipping; True for Detectron weights.")
_key("MODEL.DEVICE", "auto", "'auto' (CUDA when available), 'cpu' or 'cuda'.")

_section("RESNETS", "ResNet / ResNeXt bodies.")
_key("RESNETS.NUM_GROUPS", 1, "Groups of the 3x3 convolutions (ResNeXt cardinality; 1 for ResNet).")
_key("RESNETS.WIDTH_PER_GROUP", 64, "Channels per group in the first stage's 3x3 convolution.")
_key("RESNETS.STEM_OUT_CHANNELS", 64, "Channels of the stem (res1); 64 in every standard ResNet (pretrained weights need it).")
_key("RESNETS.RES2_OUT_CHANNELS", 0, "Output channels of res2, doubled at each later stage; 0 for the depth's standard 256 "
     "(bottleneck) or 64 (basic blocks: there it is the width, e.g. 32 for a half-width ResNet-18 trained from scratch).")
_key("RESNETS.STRIDE_1X1", True, "Put the stride in the first 1x1 conv (Caffe2/Detectron) instead of the 3x3 (torchvision).")
_key("RESNETS.TRANS_FUNC", "bottleneck_transformation",
     "Residual block: 'bottleneck_transformation' or 'basic_transformation' (ResNet-18/34, set by the body name).")
_key("RESNETS.RES5_DILATION", 1, "Dilation of res5 (1 or 2).")
_key("RESNETS.FREEZE_AT", 2, "Freeze the stem and stages up to resFREEZE_AT (0: nothing frozen, 2: stem+res2).")
_key("RESNETS.NORM", "FrozenBN", "Normalisation in the body (and C4 res5 heads): 'FrozenBN' (needs pretrained weights), 'BN', 'SyncBN' (BN synchronised over processes under DDP, CUDA; plain BN on one process) or 'GN'.")
_key("RESNETS.IMAGENET_PRETRAINED_WEIGHTS", "", "Path of an ImageNet backbone checkpoint (Caffe2 .pkl or torchvision .pth).")

_section("FPN", "Feature Pyramid Network.")
_key("FPN.FPN_ON", False, "Use FPN (set automatically by an FPN body name).")
_key("FPN.DIM", 256, "Channels of every pyramid level.")
_key("FPN.ZERO_INIT_LATERAL", False, "Zero-initialise the lateral 1x1 convolutions.")
_key("FPN.USE_GN", False, "GroupNorm in the FPN convolutions.")
_key("FPN.MULTILEVEL_ROIS", True, "Pool each RoI from the pyramid level matching its scale; False pools every RoI "
     "from the finest RoI level FPN.ROI_MIN_LEVEL (P2), as Detectron's P2-only FPN bodies.")
_key("FPN.ROI_CANONICAL_SCALE", 224, "Canonical RoI size that maps to ROI_CANONICAL_LEVEL.")
_key("FPN.ROI_CANONICAL_LEVEL", 4, "Pyramid level of an RoI of the canonical size.")
_key("FPN.ROI_MIN_LEVEL", 2, "Finest pyramid level RoIs are pooled from.")
_key("FPN.ROI_MAX_LEVEL", 5, "Coarsest pyramid level RoIs are pooled from.")
_key("FPN.MULTILEVEL_RPN", True, "Run the RPN on every pyramid level.")
_key("FPN.RPN_MIN_LEVEL", 2, "Finest RPN level.")
_key("FPN.RPN_MAX_LEVEL", 6, "Coarsest RPN level (P6 is a stride-2 max-pool of P5).")
_key("FPN.RPN_ANCHOR_START_SIZE", 32, "Anchor size at RPN_MIN_LEVEL; doubles at each coarser level.")
_key("FPN.RPN_ASPECT_RATIOS", [0.5, 1.0, 2.0], "Anchor aspect ratios (h/w) at every FPN level.")
_key("FPN.RPN_ANCHOR_STRIDES_FROM_SIZE", False,
     "Anchor stride of each level = padded image size // feature size (torchvision) instead of 2**level (Detectron).")

_section("RPN", "Region Proposal Network (single-level; FPN anchors are under FPN).")
_key("RPN.RPN_ON", True, "Use an RPN; must stay True (False, precomputed proposals, is not supported and is "
     "rejected).")
_key("RPN.SIZES", [32, 64, 128, 256, 512], "Anchor sizes (sqrt of area, input pixels) of the single-level RPN.")
_key("RPN.STRIDE", 16, "Stride of the single-level RPN feature map.")
_key("RPN.ASPECT_RATIOS", [0.5, 1.0, 2.0], "Anchor aspect ratios (h/w) of the single-level RPN.")
_key("RPN.CLS_ACTIVATION", "sigmoid", "Objectness activation; only 'sigmoid' (one logit per anchor) is supported.")
_key("RPN.ROUND_ANCHORS", True, "Round the zero-centred cell anchors to integers (torchvision's AnchorGenerator); "
     "False keeps them exact as detectron2's DefaultAnchorGenerator (w = sqrt(size^2 / ratio), h = ratio x w, "
     "OFFSET 0). MODEL.LEGACY_PLUS_ONE (Detectron's generate_anchors) needs True.")
_key("RPN.MIN_SIZE_STRICT", False, "Keep proposals whose width and height are > TRAIN/TEST.RPN_MIN_SIZE "
     "(detectron2's Boxes.nonempty: with 0 it drops empty boxes) instead of >= it (torchvision, Detectron).")
_key("RPN.NMS_ON_LOGITS", False, "Rank proposals in NMS by their objectness logits (detectron2) instead of sigmoid "
     "probabilities (torchvision), which tie at 1.0 in float32 above a logit of about 17.")
_key("RPN.HEAD_DIM", -1, "Channels of the RPN 3x3 conv; -1 means the same as its input.")
_key("RPN.LOSS_NORMALIZATION", "torchvision",
     "Divisors of the RPN losses: 'torchvision' (objectness averaged over the sampled anchors of the batch, box loss "
     "summed and divided by their number) or 'detectron' (FPN objectness summed and divided by "
     "TRAIN.RPN_BATCH_SIZE_PER_IM x images, single-level objectness averaged; box loss divided per image by that "
     "image's sampled anchors, then averaged over images).")

_section("FAST_RCNN", "Box head on RoI features.")
_key("FAST_RCNN.ROI_BOX_HEAD", "ResNet.ResNet_roi_conv5_head",
     "Box head: 'fast_rcnn_heads.roi_2mlp_head' (FPN), 'ResNet.ResNet_roi_conv5_head' (C4, res5 + avgpool), "
     "'fast_rcnn_heads.roi_Xconv1fc_head' or '..._roi_Xconv1fc_gn_head' (NUM_STACKED_CONVS 3x3 convs, with GroupNorm "
     "in the _gn one, + one fc; Detectron's GN configs).")
_key("FAST_RCNN.MLP_HEAD_DIM", 1024, "Width of the fully connected layers of roi_2mlp_head and roi_Xconv1fc(_gn)_head.")
_key("FAST_RCNN.NUM_STACKED_CONVS", 4, "3x3 convolutions of roi_Xconv1fc_head / roi_Xconv1fc_gn_head.")
_key("FAST_RCNN.CONV_HEAD_DIM", 256, "Channels of the roi_Xconv1fc(_gn)_head convolutions.")
_key("FAST_RCNN.ROI_XFORM_METHOD", "RoIAlign", "RoI feature transform: 'RoIAlign' or 'RoIPoolF'.")
_key("FAST_RCNN.ROI_XFORM_RESOLUTION", 14, "Output size of the RoI transform for the box head.")
_key("FAST_RCNN.ROI_XFORM_SAMPLING_RATIO", 0, "RoIAlign samples per bin side; <= 0 is adaptive.")
_key("FAST_RCNN.ROI_XFORM_ALIGNED", False, "RoIAlign with the half-pixel offset (detectron2's aligned=True).")
_key("FAST_RCNN.SMOOTH_L1_BETA", 1.0 / 9, "Transition point of the smooth L1 box loss: 1.0 in Detectron "
     "(fast_rcnn_heads.py, Caffe2's SmoothL1Loss default), 1/9 in torchvision (roi_heads.fastrcnn_loss); 0 is L1.")

_section("MRCNN", "Mask head.")
_key("MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v0upshare",
     "Mask head: 'mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs' (FPN), '..._v1up4convs_gn' (its convs with "
     "GroupNorm, Detectron's GN configs), '..._v1up', '..._v0upshare' (C4, shares res5), '..._v0up'.")
_key("MRCNN.RESOLUTION", 14, "Side of the predicted mask (14 for C4, 28 for FPN).")
_key("MRCNN.ROI_XFORM_METHOD", "RoIAlign", "RoI feature transform for the mask head.")
_key("MRCNN.ROI_XFORM_RESOLUTION", 7, "Output size of the RoI transform for the mask head.")
_key("MRCNN.ROI_XFORM_SAMPLING_RATIO", 0, "RoIAlign samples per bin side for the mask head; <= 0 is adaptive.")
_key("MRCNN.DIM_REDUCED", 256, "Channels of the mask head convolutions.")
_key("MRCNN.NUM_CONVS", 4, "Number of 3x3 convolutions of the v1up4convs(_gn) head.")
_key("MRCNN.DILATION", 2, "Dilation of the mask head 3x3 convolutions.")
_key("MRCNN.CLS_SPECIFIC_MASK", True, "One mask per class instead of one class-agnostic mask.")
_key("MRCNN.WEIGHT_LOSS_MASK", 1.0, "Weight of the mask loss.")
_key("MRCNN.DICE_LOSS_WEIGHT", 0.0, "Weight of a soft Dice loss added to the mask cross entropy (0: Detectron's loss).")
_key("MRCNN.THRESH_BINARIZE", 0.5, "Threshold turning mask probabilities into binary masks for results.")
_key("MRCNN.CONV_INIT", "GaussianFill", "Initialisation of mask head convolutions: 'MSRAFill' or 'GaussianFill'.")

_section("CASCADE_RCNN", "Cascade R-CNN stages (with MODEL.CASCADE_ON; detectron2's MODEL.ROI_BOX_CASCADE_HEAD): each "
         "stage has its own box head and outputs and refines the previous stage's boxes (maskrcnn/modeling/roi_heads/"
         "cascade.py).")
_key("CASCADE_RCNN.IOUS", [0.5, 0.6, 0.7], "Foreground IoU threshold of each stage; the first must equal "
     "TRAIN.FG_THRESH (stage 0 samples the RPN's proposals as the plain heads do).")
_key("CASCADE_RCNN.BBOX_REG_WEIGHTS", [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
     "Box-coder weights (wx, wy, ww, wh) of each stage (replace MODEL.BBOX_REG_WEIGHTS).")
_key("CASCADE_RCNN.STAGE_WEIGHTS", [1.0, 1.0, 1.0], "Factor on each stage's classification and box losses "
     "(detectron2: all 1; mmdetection: 1, 0.5, 0.25).")

_section("KRCNN", "Keypoint head (Keypoint R-CNN), Detectron's KRCNN keys.")
_key("KRCNN.ROI_KEYPOINTS_HEAD", "keypoint_rcnn_heads.roi_pose_head_v1convX",
     "Keypoint head: 'keypoint_rcnn_heads.roi_pose_head_v1convX' (NUM_STACKED_CONVS 3x3 convs, Detectron / torchvision).")
_key("KRCNN.NUM_KEYPOINTS", 17, "Keypoints per instance (COCO person: 17).")
_key("KRCNN.HEATMAP_SIZE", 56, "Side of the predicted heatmaps (2 * UP_SCALE * ROI_XFORM_RESOLUTION).")
_key("KRCNN.UP_SCALE", 2, "Bilinear upsampling factor after the stride-2 deconvolution of the keypoint outputs.")
_key("KRCNN.DECONV_KERNEL", 4, "Kernel of the stride-2 deconvolution kps_score_lowres (padding kernel / 2 - 1).")
_key("KRCNN.CONV_HEAD_DIM", 512, "Channels of the keypoint head convolutions.")
_key("KRCNN.CONV_HEAD_KERNEL", 3, "Kernel of the keypoint head convolutions.")
_key("KRCNN.NUM_STACKED_CONVS", 8, "Number of convolutions of roi_pose_head_v1convX.")
_key("KRCNN.CONV_INIT", "MSRAFill", "Initialisation of keypoint convolutions: 'MSRAFill' or 'GaussianFill'.")
_key("KRCNN.ROI_XFORM_METHOD", "RoIAlign", "RoI feature transform for the keypoint head.")
_key("KRCNN.ROI_XFORM_RESOLUTION", 14, "Output size of the RoI transform for the keypoint head.")
_key("KRCNN.ROI_XFORM_SAMPLING_RATIO", 2, "RoIAlign samples per bin side for the keypoint head; <= 0 is adaptive.")
_key("KRCNN.LOSS_WEIGHT", 1.0, "Weight of the keypoint loss.")
_key("KRCNN.KEYPOINT_NAMES", ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                              "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
                              "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"],
     "Names of the NUM_KEYPOINTS keypoints, in the heatmaps' order (default: COCO person, Detectron's "
     "get_keypoints()); 'left_X' / 'right_X' pairs are swapped when TEST.KPS_AUG flips the image.")
_key("KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS", True, "Average the keypoint cross-entropy over the visible keypoints "
     "of the batch (torchvision); False divides the sum by IMS_PER_BATCH * BATCH_SIZE_PER_IM * FG_FRACTION * "
     "NUM_KEYPOINTS (Detectron's fixed normaliser).")

_section("TRAIN", "Training.")
_key("TRAIN.DATASETS", [], "Training datasets: catalog names or specs (coco:ANN:IMGDIR, pennfudan:ROOT[:split], synthetic:split).")
_key("TRAIN.SCALES", [600], "Shorter-side sizes; one is drawn per image.")
_key("TRAIN.MAX_SIZE", 1000, "Longest side after resizing.")
_key("TRAIN.IMS_PER_BATCH", 2, "Images per batch per process.")
_key("TRAIN.BATCH_SIZE_PER_IM", 512, "RoIs sampled per image for the box head.")
_key("TRAIN.FG_FRACTION", 0.25, "Largest fraction of foreground among the sampled RoIs.")
_key("TRAIN.FG_THRESH", 0.5, "IoU with a ground-truth box at or above which an RoI is foreground.")
_key("TRAIN.BG_THRESH_HI", 0.5, "Upper IoU bound (exclusive) of background RoIs.")
_key("TRAIN.BG_THRESH_LO", 0.0, "Lower IoU bound (inclusive) of background RoIs.")
_key("TRAIN.USE_FLIPPED", True, "Horizontal flip augmentation (probability 0.5).")
_key("TRAIN.ASPECT_GROUPING", True, "Batch images of the same aspect-ratio group (landscape/portrait) together.")
_key("TRAIN.ASPECT_RATIO_GROUP_FACTOR", 0, "With TRAIN.ASPECT_GROUPING: 0 groups landscape and portrait images "
     "(Detectron); k >= 1 groups by width/height into torchvision's 2k + 2 bins (edges 2 ** linspace(-1, 1, 2k + 1), "
     "its references' --aspect-ratio-group-factor, 3 there): less padding in a batch when aspect ratios vary.")
_key("TRAIN.FILTER_EMPTY_GT", False, "Drop images with no (non-crowd) objects instead of training on them as negatives.")
_key("TRAIN.CROWD_FILTER_THRESH", 0.7, "Anchors/RoIs overlapping a crowd region more than this are ignored.")
_key("TRAIN.SNAPSHOT_ITERS", 20000, "Write a checkpoint every this many iterations.")
_key("TRAIN.FREEZE_CONV_BODY", False, "Freeze the whole backbone.")
_key("TRAIN.RPN_PRE_NMS_TOP_N", 12000, "Proposals kept before NMS, per image (per level with FPN).")
_key("TRAIN.RPN_POST_NMS_TOP_N", 2000, "Proposals kept after NMS, per image.")
_key("TRAIN.RPN_NMS_THRESH", 0.7, "NMS IoU threshold for proposals.")
_key("TRAIN.RPN_MIN_SIZE", 0.0, "Proposals smaller than this (input pixels) are dropped.")
_key("TRAIN.RPN_POSITIVE_OVERLAP", 0.7, "IoU at or above which an anchor is positive.")
_key("TRAIN.RPN_NEGATIVE_OVERLAP", 0.3, "IoU below which an anchor is negative.")
_key("TRAIN.RPN_FG_FRACTION", 0.5, "Largest fraction of positives among the sampled anchors.")
_key("TRAIN.RPN_BATCH_SIZE_PER_IM", 256, "Anchors sampled per image for the RPN loss.")
_key("TRAIN.RPN_STRADDLE_THRESH", -1, "Anchors crossing the image border by more than this are ignored; -1 keeps all.")
_key("TRAIN.AMP", "", "Mixed precision for training: '' (off), 'fp16' (CUDA) or 'bf16'.")
_key("TRAIN.FUSE_FROZEN_BN", True, "Run each convolution and its frozen BatchNorm as one convolution with the BN "
     "folded into its weight at every step (maskrcnn.engine.speed.prepare_for_training; same gradients, same "
     "checkpoint keys). An error on a body without frozen BN (RESNETS.NORM 'GN', or 'BN' with FREEZE_AT 0): set "
     "it False there.")
_key("TRAIN.CHANNELS_LAST", True, "Train with convolutions in channels-last memory format (the layout oneDNN "
     "convolves in; same results up to float rounding).")
_key("TRAIN.WINOGRAD", True, "On the CPU in float32 (TRAIN.AMP ''): run the forward, input gradient and weight "
     "gradient of the 3x3 stride-1 convolutions (FPN outputs, RPN, mask/keypoint heads, and the ResNet blocks' "
     "middle ones with their frozen BN folded by TRAIN.FUSE_FROZEN_BN) in the Winograd transform domain where it "
     "pays (256+ channels with at least 3 pixels per channel in the batch, or 128+ with at least 128; maps from "
     "14x14; maskrcnn.engine.winograd_training); gradients equal up to float rounding (about 1e-5 of their scale). "
     "The modules stay subclasses of their classes with the same parameters and checkpoint keys. False: oneDNN's "
     "direct convolution everywhere.")
_key("TRAIN.LOG_PERIOD", 20, "Log a line every this many iterations.")
_key("TRAIN.LOST_RANK_TIMEOUT", 60.0, "Multi-process runs: a process whose heartbeat stops this many seconds is "
     "reported lost and every other one stops with an error naming it (maskrcnn.engine.lost_rank); 0 disables.")

_section("TEST", "Inference.")
_key("TEST.DATASETS", [], "Evaluation datasets, as TRAIN.DATASETS.")
_key("TEST.SCALE", 600, "Shorter-side size at test time.")
_key("TEST.MAX_SIZE", 1000, "Longest side at test time.")
_key("TEST.NMS", 0.3, "Per-class NMS IoU threshold of the detections.")
_key("TEST.SCORE_THRESH", 0.05, "Detections scoring below this are dropped.")
_key("TEST.DETECTIONS_PER_IM", 100, "Detections kept per image.")
_key("TEST.BBOX_REG", True, "Apply the box regression to the RoIs.")
_key("TEST.MIN_BOX_SIZE", 0.0, "Detections smaller than this (input pixels of the resized image) are dropped.")
_key("TEST.RPN_PRE_NMS_TOP_N", 6000, "Proposals kept before NMS at test time, per image (per level with FPN).")
_key("TEST.RPN_POST_NMS_TOP_N", 1000, "Proposals kept after NMS at test time, per image.")
_key("TEST.RPN_NMS_THRESH", 0.7, "NMS IoU threshold for test-time proposals.")
_key("TEST.RPN_MIN_SIZE", 0.0, "Test-time proposals smaller than this are dropped.")
_key("TEST.IMS_PER_BATCH", 1, "Images per inference batch.")
_key("TEST.AMP", "", "Mixed precision at inference: '' (off), 'fp16' (CUDA) or 'bf16'; autocast around the "
     "model's forward with fp32 box and mask outputs (maskrcnn.engine.speed.prepare_for_inference).")
_key("TEST.FUSE_FROZEN_BN", True, "Fold frozen BatchNorm into the preceding convolution at inference "
     "(maskrcnn.engine.speed.prepare_for_inference; exact up to float rounding). An error on a body without "
     "BatchNorm (RESNETS.NORM 'GN'): set it False there.")
_key("TEST.FUSE_CONV_ACTIVATIONS", True, "On the CPU, run the folded ResNet and FPN convolutions as oneDNN fused "
     "conv+ReLU and conv+add+ReLU primitives (needs TEST.FUSE_FROZEN_BN).")
_key("TEST.WINOGRAD", True, "On the CPU in float32 (TEST.AMP '' and TEST.QUANTIZE ''), with "
     "TEST.FUSE_CONV_ACTIVATIONS: run the 3x3 stride-1 convolutions of 256 or more channels on maps of 14x14 or more "
     "(FPN outputs, RPN, res4/res5, mask/keypoint heads) as Winograd F(m x m, 3x3), m = 4, 5 or 6 per map size, 4x "
     "to 5x fewer multiplications (maskrcnn.ops.winograd); equal up to float rounding (about 1e-5 of the output's "
     "scale). False: oneDNN's direct convolution everywhere.")
_key("TEST.CHANNELS_LAST", True, "Run convolutions in channels-last memory format at inference.")
_key("TEST.COMPILE", False, "torch.compile the backbone at inference (compiles for tens of seconds per input size).")
_key("TEST.QUANTIZE", "", "'' (fp32) or 'int8': post-training static int8 quantization of the ResNet stages and FPN "
     "convolutions on the CPU (maskrcnn.engine.quantize; x86 FX flow), calibrated on TEST.QUANTIZE_CALIB_IMAGES images.")
_key("TEST.QUANTIZE_HEADS", True, "With TEST.QUANTIZE 'int8': also quantize the RPN's 3x3 convolution and the "
     "box/mask/keypoint heads' feature layers (convolutions, deconvolution, fc6/fc7); their predictors stay fp32. "
     "False: body and FPN only.")
_key("TEST.QUANTIZE_CALIB_IMAGES", 8, "With TEST.QUANTIZE 'int8': how many images of the evaluated dataset "
     "tools/test_net.py runs through the model to calibrate the int8 ranges (Predictor takes calib_images=).")
_key("TEST.EVAL_PERIOD", 0, "During training, run the COCO evaluation on TEST.DATASETS every this many iterations and "
     "after the last one (logged, and written to OUTPUT_DIR/metrics.jsonl); 0 disables.")
_key("TEST.MASK_PASTE_PADDING", 1, "Pixels of padding around each mask before pasting (torchvision and Detectron "
     "use 1); read by the 'torchvision' TEST.MASK_PASTE_METHOD only.")
_key("TEST.MASK_PASTE_METHOD", "torchvision", "How M x M mask probabilities are pasted into the image: "
     "'torchvision' (padded mask resized to the integer box, paste_masks_in_image) or 'detectron2' (grid_sample "
     "at pixel centres of the float box, detectron2's paste_masks_in_image; binarise with >= 0.5 as it does).")
_key("TEST.DETECTOR_POSTPROCESS", "torchvision", "How detections are mapped to the original image: 'torchvision' "
     "(boxes scaled by the size ratio) or 'detectron2' (detector_postprocess: scaled by float64 factors, clipped "
     "to the original image, boxes with a side <= 0 dropped).")

_key("TEST.KEYPOINT_OKS_SIGMAS", [], "OKS sigmas of the keypoints for keypoint AP (pycocotools' scale, e.g. 0.026 "
     "for COCO's nose); empty: COCO's 17 person sigmas, which only fit 17 keypoints (detectron2's key).")

_section("TEST.BBOX_AUG", "Test-time augmentation of the box stage (Detectron's; maskrcnn/engine/tta.py). The image "
         "is also run flipped, at other scales and at other aspect ratios, and the per-RoI predictions of every run, "
         "mapped back to the image, are merged before NMS. Used by test_net, Predictor and core.test.im_detect_all.")
_key("TEST.BBOX_AUG.ENABLED", False, "Run the box stage on the augmentations below as well as on the image at "
     "TEST.SCALE (with none of them set: the plain result, bit for bit).")
_key("TEST.BBOX_AUG.SCORE_HEUR", "UNION", "How the runs' class scores are merged: 'UNION' (every run's RoIs are "
     "candidates), 'AVG' (mean per RoI) or 'ID' (the plain run's). 'AVG'/'ID' need the same RoIs in every run: only "
     "with proposals given to core.test.im_detect_all(box_proposals=); with RPN proposals use 'UNION' (Detectron's "
     "rule). UNION here iff in COORD_HEUR.")
_key("TEST.BBOX_AUG.COORD_HEUR", "UNION", "How the runs' boxes are merged: 'UNION', 'AVG' or 'ID' (as SCORE_HEUR).")
_key("TEST.BBOX_AUG.H_FLIP", False, "Also run the horizontally flipped image at TEST.SCALE.")
_key("TEST.BBOX_AUG.SCALES", [], "Extra shorter-side sizes to run the image at (e.g. [400, 500, 700]).")
_key("TEST.BBOX_AUG.MAX_SIZE", 4000, "Longest side of the runs at SCALES.")
_key("TEST.BBOX_AUG.SCALE_H_FLIP", False, "Also run the flipped image at each of SCALES.")
_key("TEST.BBOX_AUG.SCALE_SIZE_DEP", False, "Detectron's size-dependent scaling; Detectron asserts it off for boxes "
     "(not implemented there), so only False is accepted.")
_key("TEST.BBOX_AUG.AREA_TH_LO", 2500, "Area threshold of SCALE_SIZE_DEP (unused: SCALE_SIZE_DEP is always False).")
_key("TEST.BBOX_AUG.AREA_TH_HI", 32400, "Area threshold of SCALE_SIZE_DEP (unused: SCALE_SIZE_DEP is always False).")
_key("TEST.BBOX_AUG.ASPECT_RATIOS", [], "Width factors: the image is also run with its width times each (then "
     "resized to TEST.SCALE / TEST.MAX_SIZE), e.g. [0.8, 1.25].")
_key("TEST.BBOX_AUG.ASPECT_RATIO_H_FLIP", False, "Also run the flipped image at each of ASPECT_RATIOS.")

_section("TEST.MASK_AUG", "Test-time augmentation of the mask stage (Detectron's): the masks of the final "
         "detections are predicted on each augmentation (the boxes mapped into it, flipped masks flipped back) and "
         "merged per mask pixel.")
_key("TEST.MASK_AUG.ENABLED", False, "Predict the masks on the augmentations below as well as on the image at "
     "TEST.SCALE.")
_key("TEST.MASK_AUG.HEUR", "SOFT_AVG", "How the M x M mask probabilities are merged: 'SOFT_AVG' (mean), 'SOFT_MAX' "
     "(maximum) or 'LOGIT_AVG' (sigmoid of the mean logit).")
_key("TEST.MASK_AUG.H_FLIP", False, "Also predict the masks on the flipped image at TEST.SCALE.")
_key("TEST.MASK_AUG.SCALES", [], "Extra shorter-side sizes to predict the masks at.")
_key("TEST.MASK_AUG.MAX_SIZE", 4000, "Longest side of the runs at SCALES.")
_key("TEST.MASK_AUG.SCALE_H_FLIP", False, "Also predict on the flipped image at each of SCALES.")
_key("TEST.MASK_AUG.SCALE_SIZE_DEP", False, "Detectron's size-dependent scaling; Detectron asserts it off for masks "
     "(not implemented there), so only False is accepted.")
_key("TEST.MASK_AUG.AREA_TH", 32400, "Area threshold of SCALE_SIZE_DEP (unused: SCALE_SIZE_DEP is always False).")
_key("TEST.MASK_AUG.ASPECT_RATIOS", [], "Width factors to also predict the masks at (as TEST.BBOX_AUG.ASPECT_RATIOS).")
_key("TEST.MASK_AUG.ASPECT_RATIO_H_FLIP", False, "Also predict on the flipped image at each of ASPECT_RATIOS.")

_section("TEST.KPS_AUG", "Test-time augmentation of the keypoint stage (Detectron's): the heatmaps of the final "
         "detections are predicted on each augmentation (the boxes mapped into it; flipped heatmaps flipped back with "
         "left/right keypoints swapped by KRCNN.KEYPOINT_NAMES) and merged per heatmap cell before the arg-max. "
         "Detectron's size-dependent combination (SCALE_SIZE_DEP) is not offered.")
_key("TEST.KPS_AUG.ENABLED", False, "Predict the keypoint heatmaps on the augmentations below as well as on the image "
     "at TEST.SCALE.")
_key("TEST.KPS_AUG.HEUR", "HM_AVG", "How the heatmap logits are merged: 'HM_AVG' (mean) or 'HM_MAX' (maximum).")
_key("TEST.KPS_AUG.H_FLIP", False, "Also predict the keypoints on the flipped image at TEST.SCALE.")
_key("TEST.KPS_AUG.SCALES", [], "Extra shorter-side sizes to predict the keypoints at.")
_key("TEST.KPS_AUG.MAX_SIZE", 4000, "Longest side of the runs at SCALES.")
_key("TEST.KPS_AUG.SCALE_H_FLIP", False, "Also predict on the flipped image at each of SCALES.")
_key("TEST.KPS_AUG.ASPECT_RATIOS", [], "Width factors to also predict the keypoints at (as "
     "TEST.BBOX_AUG.ASPECT_RATIOS).")
_key("TEST.KPS_AUG.ASPECT_RATIO_H_FLIP", False, "Also predict on the flipped image at each of ASPECT_RATIOS.")

_section("TEST.BBOX_VOTE", "Box voting (Detectron's, https://arxiv.org/abs/1505.01749): each detection that "
         "survives NMS becomes the score-weighted mean of the same-class candidates overlapping it; with or without "
         "TEST.BBOX_AUG (maskrcnn/ops/box_voting.py).")
_key("TEST.BBOX_VOTE.ENABLED", False, "Refine the detections by box voting (after NMS, before the per-image limit).")
_key("TEST.BBOX_VOTE.VOTE_TH", 0.8, "Candidates overlapping a detection with IoU >= this vote for its box.")
_key("TEST.BBOX_VOTE.SCORING_METHOD", "ID", "The voted detection's score: 'ID' (unchanged), 'TEMP_AVG', 'AVG', "
     "'IOU_AVG', 'GENERALIZED_AVG' or 'QUASI_SUM' (maskrcnn/ops/box_voting.py gives the formulas).")
_key("TEST.BBOX_VOTE.SCORING_METHOD_BETA", 1.0, "The parameter of TEMP_AVG (temperature), GENERALIZED_AVG (power) "
     "and QUASI_SUM (count exponent).")

_section("SOLVER", "Optimisation.")
_key("SOLVER.OPTIMIZER", "SGD", "'SGD' (with MOMENTUM) or 'AdamW' (with ADAM_BETAS, decoupled weight decay).")
_key("SOLVER.ADAM_BETAS", [0.9, 0.999], "AdamW's (beta1, beta2).")
_key("SOLVER.BASE_LR", 0.001, "Learning rate for the config's total batch (NUM_GPUS x TRAIN.IMS_PER_BATCH); "
     "rescaled linearly with the run's total batch (SCALE_WITH_BATCH, Detectron's rule), stated in the log.")
_key("SOLVER.LR_POLICY", "steps_with_decay", "Learning-rate policy: 'steps_with_decay' (multi-step: x GAMMA at each "
     "of STEPS), 'cosine_decay' (half cosine from BASE_LR to BASE_LR_END at MAX_ITER) or 'constant'; warm-up first.")
_key("SOLVER.BASE_LR_END", 0.0, "Final learning rate of 'cosine_decay' (rescaled with BASE_LR).")
_key("SOLVER.GAMMA", 0.1, "Learning-rate factor at each step.")
_key("SOLVER.STEPS", [0, 30000, 40000], "Iterations at which the learning rate is multiplied by GAMMA (a leading 0 is allowed).")
_key("SOLVER.MAX_ITER", 40000, "Training iterations.")
_key("SOLVER.MOMENTUM", 0.9, "SGD momentum.")
_key("SOLVER.WEIGHT_DECAY", 0.0001, "L2 weight decay.")
_key("SOLVER.WEIGHT_DECAY_GN", 0.0, "Weight decay of norm (GroupNorm, BatchNorm) parameters when WEIGHT_DECAY_NORM < 0 "
     "(Detectron's key).")
_key("SOLVER.WEIGHT_DECAY_NORM", -1.0, "Weight decay of norm (GroupNorm, BatchNorm) weights and biases; < 0 uses "
     "WEIGHT_DECAY_GN (detectron2's key; 0.0 = no decay on norms).")
_key("SOLVER.WEIGHT_DECAY_BIAS", -1.0, "Weight decay of the biases of convs and fcs; < 0 uses WEIGHT_DECAY if "
     "BIAS_WEIGHT_DECAY else 0 (Detectron's rule; detectron2's key).")
_key("SOLVER.BIAS_DOUBLE_LR", True, "Biases learn at twice the learning rate (Detectron).")
_key("SOLVER.BIAS_WEIGHT_DECAY", False, "Apply weight decay to biases.")
_key("SOLVER.WARM_UP_ITERS", 500, "Warm-up iterations.")
_key("SOLVER.WARM_UP_FACTOR", 1.0 / 3.0, "Learning-rate factor at the start of warm-up.")
_key("SOLVER.WARM_UP_METHOD", "linear", "Warm-up: 'linear' or 'constant'.")
_key("SOLVER.CLIP_GRAD_NORM", 0.0, "Clip the gradient norm to this value; 0 disables.")
_key("SOLVER.EMA_DECAY", 0.0, "Exponential moving average of the weights, updated every iteration with this decay "
     "(e.g. 0.999; 0 = off); checkpointed and resumed, and the EMA weights are evaluated and saved in model_final.pth.")
_key("SOLVER.CHECKPOINT_BEST", "", "Keep OUTPUT_DIR/model_best.pth, the weights at the evaluation (TEST.EVAL_PERIOD) "
     "with the highest value of this metric, e.g. 'segm/AP', 'bbox/AP50', 'bbox/AR100', 'segm/AP-<class>'; '' disables.")
_key("SOLVER.SCALE_WITH_BATCH", True, "Scale LR and schedule linearly when the total batch differs from the config's (Detectron's rule).")

_section("DATA_LOADER", "Data loading.")
_key("DATA_LOADER.NUM_THREADS", 2, "Worker processes per training process (0 loads in the main process).")
_key("DATA_LOADER.MAX_IMAGE_SIDE", 4096, "COCO-format images whose longer side exceeds this many pixels are decoded "
     "at reduced resolution and resized to it (boxes and masks scaled with them), so a 12000x9000 photo never "
     "occupies memory at full size; test results are mapped back to the size the json records. 0 turns it off.")
_key("DATA_LOADER.CACHE_RAM_MB", 0, "Keep the training set's decoded items in memory (before augmentation) up to this many "
     "MiB per loading process, so that each image is decoded once (small sets on a CPU; 0 off). Best with NUM_THREADS 0: "
     "each worker keeps its own copy.")
_key("DATA_LOADER.SKIP_UNREADABLE", False, "Skip images that cannot be read instead of failing before training starts.")

_section("AUTO", "Recipe chosen from the training set's statistics (train_net --auto); an explicit key always wins.")
_key("AUTO.ENABLED", False, "Before training, read the training set's statistics and choose input scale, anchors, "
     "sampling sizes, batch and schedule (maskrcnn/engine/auto_recipe.py); set by train_net --auto.")
_key("AUTO.BUDGET_MINUTES", 10.0, "Training time the automatic schedule fills: SOLVER.MAX_ITER from a few timed "
     "steps (train_net --budget); 0 keeps SOLVER.MAX_ITER.")
_key("AUTO.STATS_MAX_IMAGES", 200, "Training images read for the statistics (evenly spaced; 0 reads all).")
_key("AUTO.MIN_OBJECT_SIZE", 16, "Input pixels (sqrt of box area) the 10th-percentile object should reach after "
     "the resize the automatic input scale chooses.")
_key("AUTO.MIN_INPUT_SIZE", 128, "Smallest shorter-side input size the automatic scale chooses (unless the images "
     "are smaller than half of it).")
_key("AUTO.MAX_INPUT_SIZE", 512, "Largest shorter-side input size the automatic scale chooses.")
_key("AUTO.MAX_UPSCALE", 2.0, "Largest factor the automatic input scale enlarges the median image by.")
_key("AUTO.ANCHOR_IOU", 0.5, "IoU a ground-truth box's best anchor must reach to count as recalled in the anchor fit.")
_key("AUTO.TIMING_ITERS", 5, "Training steps timed (after 2 untimed ones) to size SOLVER.MAX_ITER to the budget.")
_key("AUTO.TRY_BF16", True, "With a budget: also time bf16-autocast training steps (same batches) and train with "
     "TRAIN.AMP bf16 when they are at least 5% faster than fp32 (CPUs with AMX or AVX512-BF16, recent GPUs).")
_key("AUTO.TEST_AUG_SCALE", 1.25, "Test-time augmentation --auto adds: one more run of the box and mask stages at "
     "this factor times TEST.SCALE / TEST.MAX_SIZE (TEST.BBOX_AUG / TEST.MASK_AUG, boxes merged by UNION, masks "
     "averaged); 0 adds none. Not chosen when any TEST.BBOX_AUG or TEST.MASK_AUG key is set explicitly.")

#: Body names accepted by MODEL.CONV_BODY (prefix optional).
CONV_BODIES = tuple(
    [f"ResNet.ResNet{d}_conv{c}_body" for d in (18, 34, 50, 101, 152) for c in (4, 5)]
    + [f"FPN.fpn_ResNet{d}_conv5_body" for d in (18, 34, 50, 101, 152)]
)
BOX_HEADS = ("fast_rcnn_heads.roi_2mlp_head", "ResNet.ResNet_roi_conv5_head", "fast_rcnn_heads.roi_Xconv1fc_head",
             "fast_rcnn_heads.roi_Xconv1fc_gn_head")
MASK_HEADS = (
    "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs",
    "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs_gn",
    "mask_rcnn_heads.mask_rcnn_fcn_head_v1up",
    "mask_rcnn_heads.mask_rcnn_fcn_head_v0upshare",
    "mask_rcnn_heads.mask_rcnn_fcn_head_v0up",
)

#: Keys that no code reads: kept only so that Detectron config files load unchanged. Each one has a single
#: supported value (its default), or none that matters. ``assert_and_infer_cfg`` rejects a value the model cannot
#: honour (see ``config/validate.py``) and logs a warning naming the key and the file for any other non-default
#: value, so that setting one never changes nothing silently. ``tests/config/test_key_usage.py`` fails for a key
#: that is neither read somewhere in ``maskrcnn/`` or ``tools/`` nor listed here.
DETECTRON_COMPAT_KEYS: Dict[str, str] = {
    # Detectron read it in a few numpy helpers (e.g. box-target normalisation); our ops carry their own epsilons.
    "EPS": "nothing reads it; the ops use their own numerical-stability constants",
    # Detectron's one model family; the value only selected the model builder there.
    "MODEL.TYPE": "'generalized_rcnn' is the only model",
    # False is Fast R-CNN on precomputed proposals (Detectron's PROPOSAL_FILES), which is not implemented.
    "MODEL.FASTER_RCNN": "only end-to-end Faster/Mask R-CNN (True) is supported",
    # Detectron infers RPN_ON from FASTER_RCNN / RPN_ONLY; False only makes sense with precomputed proposals.
    "RPN.RPN_ON": "every model has an RPN (True); precomputed proposals are not supported",
    # Detectron also had 'softmax' (two logits per anchor); the RPN head here has one sigmoid logit per anchor.
    "RPN.CLS_ACTIVATION": "only 'sigmoid' is supported",
    # Detectron declares size-dependent test-time scaling for boxes and masks but asserts it off (only its keypoint
    # augmentation implements it); validation accepts False only, and the area thresholds then mean nothing.
    "TEST.BBOX_AUG.SCALE_SIZE_DEP": "Detectron does not implement it for boxes; only False is accepted",
    "TEST.BBOX_AUG.AREA_TH_LO": "only used by TEST.BBOX_AUG.SCALE_SIZE_DEP, which is always False",
    "TEST.BBOX_AUG.AREA_TH_HI": "only used by TEST.BBOX_AUG.SCALE_SIZE_DEP, which is always False",
    "TEST.MASK_AUG.SCALE_SIZE_DEP": "Detectron does not implement it for masks; only False is accepted",
    "TEST.MASK_AUG.AREA_TH": "only used by TEST.MASK_AUG.SCALE_SIZE_DEP, which is always False",
}
