"""``Predictor``: a config and weights in, a callable on image files, arrays and tensors out, fast by default.

    from maskrcnn import Predictor

    predictor = Predictor("configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", "model_final.pth")
    out = predictor("demo.jpg")                           # one image -> one dict
    outs = predictor([cv2.imread("a.jpg"), rgb_array], format="BGR")   # a list -> a list, run in batches

It builds the model, loads any weight format :func:`~maskrcnn.utils.checkpoint.load_ckpt` knows (ours, Detectron
``.pkl``, Detectron.pytorch, torchvision, detectron2), moves it to the device and applies the config's inference
speed features with :func:`~maskrcnn.engine.speed.prepare_for_inference` (folded BN, fused convolutions,
channels-last, ``TEST.AMP`` mixed precision, ``TEST.COMPILE``). It never downloads anything: the weights are the
file (or dict) you pass, and an untrained model must be asked for explicitly (``random_weights=True``).

A researcher who builds ``Generalized_RCNN`` by hand gets the same speed with
``prepare_for_inference(model.to(device), cfg)`` and ``model(images)`` under ``torch.inference_mode()``; that is
all a Predictor does besides reading the inputs.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Predictor", "load_config", "default_class_names", "image_to_rgb_tensor", "IMAGE_FORMATS"]

#: Channel orders a NumPy array may be given in (``format=`` of :meth:`Predictor.__call__`).
IMAGE_FORMATS = ("BGR", "RGB")

# COCO category ids of the 80 classes, in the order of COCO_CLASSES[1:]; a 91-class model (torchvision's) predicts
# the category id itself as its label, and the ids in between are unused ("N/A", as torchvision names them).
_COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)

ImageInput = Union[str, os.PathLike, np.ndarray, Tensor, "PIL.Image.Image"]


# --------------------------------------------------------------------------------------------------------------------
# Config and class names
def load_config(cfg_or_path: Any, overrides: Sequence[Any] = ()):
    """A validated, frozen config from a YAML path, a ``CfgNode`` (copied, never modified) or a dict (e.g. a
    checkpoint's saved ``"cfg"`` YAML parsed with ``yaml.safe_load``), with ``overrides`` (``[KEY, VALUE, ...]``
    as for ``--set``) merged last.

    Raises:
        ConfigError: unknown key, wrong type or impossible value (the message names the key and the file).
        TypeError: ``cfg_or_path`` is none of the above.
    """
    from yacs.config import CfgNode as _CN

    from .config import assert_and_infer_cfg, get_cfg

    cfg = get_cfg()
    source = None
    if isinstance(cfg_or_path, (str, os.PathLike)):
        source = os.fspath(cfg_or_path)
        cfg.merge_from_file(source)
    elif isinstance(cfg_or_path, _CN):
        cfg.merge_from_other_cfg(cfg_or_path)
        cfg.__dict__["_sources"] = list(cfg_or_path.__dict__.get("_sources", []))
    elif isinstance(cfg_or_path, Mapping):
        cfg.merge_from_other_cfg(_CN(dict(cfg_or_path)))
    else:
        raise TypeError(f"config must be a YAML path, a CfgNode or a dict, got {type(cfg_or_path).__name__}")
    if overrides:
        cfg.merge_from_list(list(overrides))
    return assert_and_infer_cfg(cfg, source=source)


def default_class_names(num_classes: int) -> List[str]:
    """Names for labels ``0..num_classes-1`` (index 0 is ``"__background__"``) when neither the checkpoint nor the
    caller gives any: COCO's for 81 classes (Detectron's contiguous labels) and for 91 classes (torchvision's labels
    are COCO category ids; unused ids are ``"N/A"``), else ``"class k"``."""
    from .utils.vis import COCO_CLASSES

    n = int(num_classes)
    if n == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    if n == _COCO_CATEGORY_IDS[-1] + 1:
        names = ["__background__"] + ["N/A"] * (n - 1)
        for cat_id, name in zip(_COCO_CATEGORY_IDS, COCO_CLASSES[1:]):
            names[cat_id] = name
        return names
    return ["__background__"] + [f"class {k}" for k in range(1, n)]


def _checkpoint_metadata(weights: Any) -> Dict[str, Any]:
    """``classes`` and ``cfg`` entries of a checkpoint (a path or a loaded dict); ``{}`` when it has none.

    A file is memory-mapped, so reading these two small entries does not read the tensors; any problem with the
    file is left to :func:`load_ckpt`, whose errors name it and say what is wrong."""
    obj: Any = weights
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
            return {}  # Detectron .pkl and legacy files carry neither entry
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 (load_ckpt reports it properly right after)
            return {}
    if not isinstance(obj, Mapping):
        return {}
    return {k: obj[k] for k in ("classes", "cfg") if obj.get(k)}


def _check_class_names(names: Sequence[Any], num_classes: int, source: str) -> List[str]:
    from .config import ConfigError

    names = [str(n) for n in names]
    if len(names) != int(num_classes):
        raise ConfigError(f"{source}: {len(names)} class names {names[:5]}{'...' if len(names) > 5 else ''} but the "
                         f"model has {num_classes} classes (MODEL.NUM_CLASSES, the background included as names[0])")
    return names


# --------------------------------------------------------------------------------------------------------------------
# Inputs
def _check_format(fmt: Any) -> None:
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"format={fmt!r} is not known; use one of {IMAGE_FORMATS} (it applies to NumPy arrays)")


def _array_to_rgb(a: np.ndarray, fmt: str, who: str) -> np.ndarray:
    """An image array in ``fmt`` order -> ``(H, W, 3)`` RGB, uint8 or float32 in ``[0, 1]`` (a view when possible)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # grayscale: the same in either channel order
    elif not (a.ndim == 3 and a.shape[2] in (3, 4)):
        raise ValueError(f"{who}: a NumPy image must be (H, W, 3) (or (H, W) gray, (H, W, 4) with alpha), got shape "
                         f"{a.shape}; a (3, H, W) array is channels-first: pass a.transpose(1, 2, 0)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{who}: empty image of shape {a.shape}")
    a = a[:, :, :3]  # alpha dropped, as the file reader does
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)  # 16-bit like read_image_rgb: 65535 -> 255
    elif a.dtype in (np.float32, np.float64, np.float16):
        _check_unit_range(float(a.min()), float(a.max()), who)
        a = a.astype(np.float32)
    elif a.dtype != np.uint8:
        raise ValueError(f"{who}: unsupported array dtype {a.dtype}; use uint8 (0..255), uint16 or float in [0, 1]")
    return a[:, :, ::-1] if fmt == "BGR" else a


def _check_unit_range(lo: float, hi: float, who: str) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{who}: a float image must hold values in [0, 1], got [{lo:g}, {hi:g}]; pass 0..255 images "
                         f"as uint8, or divide by 255")


def image_to_rgb_tensor(image: Any, format: str = "BGR", who: str = "image") -> Tensor:  # noqa: A002
    """One input image as the model's input: a ``(3, H, W)`` float32 RGB CPU (or same-device) tensor in ``[0, 1]``.

    Accepted:
        * a path (``str`` / ``os.PathLike``): read with :func:`~maskrcnn.data.transforms.read_image_rgb` (OpenCV,
          EXIF orientation applied, gray and 16-bit converted, truncated files refused);
        * a NumPy array ``(H, W, 3)`` in ``format`` order (``"BGR"`` as ``cv2.imread`` returns, or ``"RGB"``),
          ``(H, W)`` gray or ``(H, W, 4)`` (alpha dropped); dtype uint8, uint16 or float in ``[0, 1]``;
        * a PIL image (converted to RGB; 16-bit modes ``I;16``/``I`` like a uint16 array, ``F`` like a float
          array in ``[0, 1]``);
        * a tensor ``(3, H, W)`` RGB, float in ``[0, 1]`` or uint8 (``format`` does not apply: tensors are RGB, as
          torchvision's models take them).

    Raises:
        FileNotFoundError / OSError: a path that does not exist or is not a readable image (the path is named).
        ValueError: a wrong shape, dtype, value range or format (the value is named).
        TypeError: anything else.
    """
    from PIL import Image

    from .data.transforms import read_image_rgb, to_float_tensor

    _check_format(format)
    if isinstance(image, (str, os.PathLike)):
        return to_float_tensor(read_image_rgb(os.fspath(image)))
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"{who}: a tensor image must be (3, H, W) RGB, got shape {tuple(image.shape)}"
                             + ("; an (H, W, 3) tensor is channels-last: pass t.permute(2, 0, 1)"
                                if image.dim() == 3 and image.shape[-1] == 3 else ""))
        if image.dtype == torch.uint8:
            return image.float().div_(255.0)
        if not image.is_floating_point():
            raise ValueError(f"{who}: unsupported tensor dtype {image.dtype}; use uint8 or float in [0, 1]")
        lo, hi = torch.aminmax(image)
        _check_unit_range(float(lo), float(hi), who)
        return image.float()
    if isinstance(image, Image.Image):
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            # PIL's convert("RGB") clips these to 0..255 (a 16-bit photo turns white, a float one black): read
            # their values as the array path does (uint16 >> 8; float in [0, 1]).
            a = np.array(image)
            if image.mode == "I":
                if a.size and (a.min() < 0 or a.max() > 65535):
                    raise ValueError(f"{who}: a PIL image of mode 'I' must hold 0..65535 (16-bit), got "
                                     f"{a.min()}..{a.max()}")
                a = a.astype(np.uint16)
            elif a.dtype != np.float32:
                a = a.astype(np.uint16)  # I;16, I;16B: native byte order
            return image_to_rgb_tensor(a, "RGB", who)
        return to_float_tensor(np.array(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, format, who)
        if rgb.dtype == np.uint8:
            return to_float_tensor(rgb)
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    raise TypeError(f"{who}: expected an image path, a NumPy array, a PIL image or a (3, H, W) tensor, got "
                    f"{type(image).__name__}")


# --------------------------------------------------------------------------------------------------------------------
class Predictor:
    """Inference front door: call it on images, get torchvision-style detections with class names.

    Test-time augmentation (``TEST.BBOX_AUG`` / ``TEST.MASK_AUG`` in the config or ``overrides``) applies to every
    call (:mod:`maskrcnn.engine.tta`).

    Args:
        cfg: a YAML config path, a ``CfgNode`` (copied) or None to use the config saved in the ``weights``
            checkpoint (``train_net`` saves it as ``"cfg"``).
        weights: a checkpoint path or a loaded checkpoint / state dict, in any format ``load_ckpt`` knows.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; default ``MODEL.DEVICE`` (``auto``: CUDA
            when available).
        overrides: config overrides ``[KEY, VALUE, ...]`` as ``--set`` takes them, merged after ``cfg``.
        score_thresh: shorthand for the override ``TEST.SCORE_THRESH`` (detections scoring below are dropped
            before the ``TEST.DETECTIONS_PER_IM`` limit).
        batch_size: images per forward when called on a list; default ``TEST.IMS_PER_BATCH``.
        class_names: names for labels ``0..NUM_CLASSES-1`` (``[0]`` the background); default the checkpoint's
            ``"classes"`` entry, else :func:`default_class_names` (COCO for 81 or 91 classes, else ``"class k"``).
        random_weights: allow ``weights=None`` (an untrained model: tests, benchmarks). Without it a missing
            ``weights`` is an error, so a forgotten argument never yields a silently random detector.
        calib_images: with ``TEST.QUANTIZE 'int8'`` (CPU), a few ``(3, H, W)`` float images of your data in [0, 1]
            RGB as the model takes them, run once to calibrate the int8 ranges; required then (``ConfigError``).

    Raises:
        ValueError: no weights (and not ``random_weights``), a bad ``device`` or ``batch_size``.
        ConfigError: a bad config or override, no config (none given, none in the checkpoint), class names that do
        not match the number of classes. CheckpointError / CheckpointMismatchError: unreadable weights or
        weights that do not fit the config (their messages name the file and the keys).
    """

    def __init__(self, cfg: Any = None, weights: Any = None, *, device: Union[str, torch.device, None] = None,
                 overrides: Sequence[Any] = (), score_thresh: Optional[float] = None,
                 batch_size: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 random_weights: bool = False, calib_images: Optional[Sequence[Any]] = None):
        from .config import ConfigError
        from .engine.speed import prepare_for_inference
        from .modeling.generalized_rcnn import Generalized_RCNN
        from .utils.checkpoint import load_ckpt

        if weights is None and not random_weights:
            raise ValueError("Predictor: no weights given; pass weights=<checkpoint path or state dict> (any format "
                             "load_ckpt reads), or random_weights=True for an untrained model (tests, benchmarks)")
        meta = _checkpoint_metadata(weights) if weights is not None else {}
        if cfg is None:
            if "cfg" not in meta:
                raise ConfigError(f"Predictor: no config given and the weights {_describe(weights)} hold no saved "
                                 f"config; pass cfg=<YAML path or CfgNode> (--cfg on the command line)")
            import yaml
            cfg = yaml.safe_load(meta["cfg"])
        overrides = list(overrides) + (["TEST.SCORE_THRESH", float(score_thresh)] if score_thresh is not None else [])
        cfg = load_config(cfg, overrides)
        model = Generalized_RCNN(cfg)
        if weights is not None:
            load_ckpt(model, weights)
        device = _resolve_device(device, cfg)
        # calib_images: (3, H, W) float tensors (as predict() takes them after to_tensor) for TEST.QUANTIZE int8.
        prepare_for_inference(model.to(device), cfg, calib_images=calib_images)
        names = class_names if class_names is not None else meta.get("classes")
        source = "class_names" if class_names is not None else f"the 'classes' of {_describe(weights)}"
        self._setup(model, cfg, device, names, source, batch_size)

    @classmethod
    def from_model(cls, model: nn.Module, cfg: Any = None, *, class_names: Optional[Sequence[str]] = None,
                   device: Union[str, torch.device, None] = None, prepare: bool = True,
                   batch_size: Optional[int] = None, calib_images: Optional[Sequence[Any]] = None) -> "Predictor":
        """A Predictor around an already-built model (e.g. one just trained in the same process).

        Args:
            model: a ``Generalized_RCNN`` (or any module with the same eval contract).
            cfg: its config; default ``model.cfg``.
            class_names: as for the constructor (default :func:`default_class_names`); checked against the
                model's ``Box_Outs.num_classes``, which differs from ``cfg`` when the predictors were replaced.
            device: move the model there first; default: where its parameters are.
            prepare: apply :func:`~maskrcnn.engine.speed.prepare_for_inference` (``cfg``'s ``TEST`` switches). It
                changes ``model`` in place and for inference only (folded BN does not train): pass a
                ``copy.deepcopy(model)`` to keep training the original. ``False`` for a model already prepared.
            batch_size: as for the constructor.
            calib_images: with ``TEST.QUANTIZE 'int8'``, a few ``(3, H, W)`` float images of your data to calibrate
                the int8 ranges (required then; see :mod:`maskrcnn.engine.quantize`).
        """
        from .engine.speed import prepare_for_inference
        from .utils.model import model_device

        cfg = cfg if cfg is not None else getattr(model, "cfg", None)
        if cfg is None:
            raise ValueError("Predictor.from_model: the model has no .cfg; pass cfg=")
        cfg = load_config(cfg)
        if device is not None:
            model.to(torch.device(device))
        device = model_device(model)
        if prepare:
            prepare_for_inference(model, cfg, calib_images=calib_images)
        model.eval()
        self = cls.__new__(cls)
        self._setup(model, cfg, device, class_names, "class_names", batch_size)
        return self

    def _setup(self, model: nn.Module, cfg, device: torch.device, names: Optional[Sequence[Any]], source: str,
               batch_size: Optional[int]) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.device = torch.device(device)
        # A model whose predictors were replaced (fine-tuning surgery) counts its classes in Box_Outs, not in cfg.
        num_classes = int(getattr(getattr(model, "Box_Outs", None), "num_classes", cfg.MODEL.NUM_CLASSES))
        self.class_names: List[str] = (_check_class_names(names, num_classes, source) if names is not None
                                       else default_class_names(num_classes))
        from .engine.tta import with_test_time_augmentation

        # TEST.BBOX_AUG / TEST.MASK_AUG: the same detections contract, from several runs per image.
        self._detector = with_test_time_augmentation(self.model, cfg)
        batch_size = int(cfg.TEST.IMS_PER_BATCH) if batch_size is None else batch_size
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Predictor: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size

    # ----------------------------------------------------------------------------------------------------------------
    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], *, format: str = "BGR"  # noqa: A002
                 ) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        """Detect objects.

        Args:
            images: one image, a list/tuple of images, or a ``(B, 3, H, W)`` tensor (B images); an image is a path,
                a NumPy array, a PIL image or a ``(3, H, W)`` tensor (see :func:`image_to_rgb_tensor`). Images
                may differ in size. A list is read and run in batches of ``batch_size`` (one ``model(batch)``
                call each), all under ``torch.inference_mode()``; a bad image raises when its batch is reached.
            format: channel order of NumPy arrays, ``"BGR"`` (as ``cv2.imread`` returns; the default) or ``"RGB"``
                (e.g. ``np.asarray(PIL image)``). Paths, PIL images and tensors are unaffected.

        Returns:
            for one image a dict, for several a list of dicts (in input order), each on the CPU:

            * ``boxes`` ``(N, 4)`` float32 ``x1, y1, x2, y2`` in the input image's pixels;
            * ``labels`` ``(N,)`` int64 in ``1..NUM_CLASSES-1``; ``scores`` ``(N,)`` float32, descending per class;
            * ``masks`` ``(N, 1, H, W)`` float32 mask probabilities in ``[0, 1]`` (not thresholded, as torchvision
              returns them; ``> cfg.MRCNN.THRESH_BINARIZE`` (0.5) gives the binary masks), only with
              ``MODEL.MASK_ON``;
            * ``keypoints`` ``(N, K, 3)`` float32 ``x, y, 1`` in the input image's pixels and ``keypoints_scores``
              ``(N, K)`` (heatmap logits), only with ``MODEL.KEYPOINTS_ON``;
            * ``class_names`` ``list[str]`` of length ``N``: the name of each detection's label.
        """
        _check_format(format)
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        items = [images] if single else list(images)
        outputs: List[Dict[str, Any]] = []
        with torch.inference_mode():
            # Read batch by batch: a long list of files is never all decoded in memory at once.
            for start in range(0, len(items), self.batch_size):
                batch = [image_to_rgb_tensor(im, format, who="image" if single else f"images[{start + i}]")
                         .to(self.device, non_blocking=True)
                         for i, im in enumerate(items[start:start + self.batch_size])]
                outputs.extend(self._to_user(out) for out in self._detector(batch))
        return outputs[0] if single else outputs

    def _to_user(self, out: Dict[str, Tensor]) -> Dict[str, Any]:
        res: Dict[str, Any] = {"boxes": out["boxes"].float().cpu(), "labels": out["labels"].long().cpu(),
                               "scores": out["scores"].float().cpu()}
        if "masks" in out:
            res["masks"] = out["masks"].float().cpu()
        for key in ("keypoints", "keypoints_scores"):
            if key in out:
                res[key] = out[key].float().cpu()
        res["class_names"] = [self.class_names[int(k)] for k in res["labels"].tolist()]
        return res

    def __repr__(self) -> str:
        return (f"Predictor({type(self.model).__name__}, {self.cfg.MODEL.CONV_BODY}, "
                f"{len(self.class_names)} classes, device={self.device}, batch_size={self.batch_size}, "
                f"amp={self.cfg.TEST.AMP or 'off'})")


def _describe(weights: Any) -> str:
    return repr(os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else "(in-memory dict)"


def _resolve_device(device: Union[str, torch.device, None], cfg) -> torch.device:
    from .utils.env import resolve_device

    if device is None:
        return resolve_device(str(cfg.MODEL.DEVICE))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Predictor: device={str(device)!r} but CUDA is not available here; use device='cpu'")
    return device

