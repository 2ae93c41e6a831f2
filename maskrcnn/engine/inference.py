"""Inference over a dataset: sharded across processes, resumable, converted to COCO results.

Each process runs its contiguous shard of the images and appends one json line per image to
``output_dir/inference/partial_rank<r>.jsonl`` as soon as the image is done (boxes, scores, labels and RLE masks,
already compact). The first line of each file is a fingerprint of what produced it (checkpoint, config, dataset).
An interrupted run started again with ``resume=True`` reads every partial file whose fingerprint matches, skips the
images already done (a line cut by the interruption is dropped) and runs the rest; a fingerprint that does not
match is reported and the images are run again.

Records (one per image): ``{"index": dataset index, "image_id", "boxes": [[x1, y1, x2, y2], ...] (input pixels),
"scores": [...], "labels": [1..K, ...], "segms": [RLE with str counts, ...], "keypoints": [[x1, y1, v1, ...], ...]}``
(``segms`` only with masks, ``keypoints`` only with a keypoint head).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..evaluation.coco import contiguous_to_category_id, dataset_image_id, mask_to_rle
from ..utils import distributed as dist_utils
from ..utils.checkpoint import atomic_write
from ..utils.logger import Progress

__all__ = ["RangeDataset", "prediction_record", "inference_on_dataset", "records_to_coco_results",
           "evaluate_on_dataset", "write_coco_results", "PARTIAL_DIR"]

logger = logging.getLogger("maskrcnn.inference")

PARTIAL_DIR = "inference"


class _Subset(Dataset):
    """Items ``indices[i]`` of ``dataset``, keeping ``get_image_info`` (for loader error messages)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def get_image_info(self, i: int) -> Dict[str, Any]:
        return self.dataset.get_image_info(self.indices[i])

    def __repr__(self) -> str:
        return f"{self.dataset!r}[{len(self.indices)} images]"


class RangeDataset(Dataset):
    """Items ``[start, end)`` of ``dataset`` (``test_net.py --range``), with its ``classes``, label maps, COCO
    ground truth and ``get_image_info``."""

    def __init__(self, dataset: Dataset, start: int, end: int):
        n = len(dataset)
        start, end = int(start), min(int(end), n)
        if not 0 <= start < end:
            raise ValueError(f"--range {start} {end}: need 0 <= A < B and A < {n} (the dataset has {n} images)")
        self.dataset, self.start, self.end = dataset, start, end
        for attr in ("classes", "contiguous_to_category_id", "category_id_to_contiguous", "coco"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"RangeDataset: index {i} out of range for {len(self)} images")
        return self.dataset[self.start + i]

    def get_image_info(self, i: int) -> Dict[str, Any]:
        return self.dataset.get_image_info(self.start + i)

    def __repr__(self) -> str:
        return f"{self.dataset!r}[{self.start}:{self.end}]"


def prediction_record(index: int, image_id: int, output: Dict[str, Tensor], mask_threshold: float = 0.5,
                      image_size: Optional[Tuple[int, int]] = None, original_size: Optional[Tuple[int, int]] = None
                      ) -> Dict[str, Any]:
    """A json-ready record of one image's detections (see the module docstring); masks (N,1,H,W) probabilities
    are binarised with ``> mask_threshold`` and RLE-encoded.

    ``image_size`` / ``original_size``: ``(h, w)`` of the image the model saw and of the image as the dataset's
    json records it. When they differ (a very large image read reduced, cfg ``DATA_LOADER.MAX_IMAGE_SIDE``) the
    record is mapped to ``original_size``: boxes scaled, each binary mask resized (nearest) one at a time, so that
    the results are in the ground truth's coordinates without ever holding all masks at full size.
    """
    boxes = output["boxes"].detach().float().cpu().reshape(-1, 4)
    rescale = (image_size is not None and original_size is not None
               and tuple(int(v) for v in image_size) != tuple(int(v) for v in original_size))
    if rescale:
        (h, w), (out_h, out_w) = image_size, original_size
        boxes = boxes * torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    # Rounded to 1/1000 pixel and 1e-6 in score: far below what COCO evaluation can see, and half the file size.
    rec: Dict[str, Any] = {"index": int(index), "image_id": int(image_id),
                           "boxes": [[round(v, 3) for v in b] for b in boxes.tolist()],
                           "scores": [round(v, 6) for v in output["scores"].detach().float().cpu().tolist()],
                           "labels": [int(v) for v in output["labels"].detach().cpu().tolist()]}
    if "masks" in output:
        masks = output["masks"].detach()
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = (masks > mask_threshold).to(torch.uint8).cpu().numpy()
        if rescale:
            size = (int(out_w), int(out_h))
            rec["segms"] = [mask_to_rle(cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)[None])[0] for m in binary]
        else:
            rec["segms"] = mask_to_rle(binary) if binary.shape[0] else []
    if "keypoints" in output:
        kps = output["keypoints"].detach().float().cpu().clone()
        if rescale:
            kps[..., 0] *= out_w / w
            kps[..., 1] *= out_h / h
        rec["keypoints"] = [[round(v, 2) for v in k] for k in kps.flatten(1).tolist()]
    return rec


def _recorded_size(dataset, index: int) -> Optional[Tuple[int, int]]:
    """``(height, width)`` the dataset's json records for item ``index``, or None when it keeps no such record."""
    get_info = getattr(dataset, "get_image_info", None)
    if get_info is None:
        return None
    info = get_info(index)
    if "height" not in info or "width" not in info:
        return None
    return int(info["height"]), int(info["width"])


# ---------------------------------------------------------------------------------------------------------------
# Partial result files
# ---------------------------------------------------------------------------------------------------------------
def _partial_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, PARTIAL_DIR, f"partial_rank{rank}.jsonl")


def _read_partial(path: str, fingerprint: str) -> Tuple[Optional[List[Dict[str, Any]]], int, str]:
    """``(records or None when unusable, byte length of the valid part, reason)``."""
    records: List[Dict[str, Any]] = []
    good = 0
    with open(path, "rb") as f:
        header = f.readline()
        try:
            head = json.loads(header.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None, 0, "its first line (the fingerprint) is unreadable"
        if not header.endswith(b"\n") or head.get("fingerprint") != fingerprint:
            return None, 0, ("it was written for another checkpoint, config or dataset "
                             f"(fingerprint {head.get('fingerprint')!r}, this run {fingerprint!r})")
        good = len(header)
        for line in f:
            if not line.endswith(b"\n"):
                break  # cut by the interruption
            try:
                rec = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                break
            records.append(rec)
            good += len(line)
    return records, good, ""


def _load_previous(output_dir: str, fingerprint: str, log: Callable[[str], Any]) -> Dict[int, Dict[str, Any]]:
    done: Dict[int, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(output_dir, PARTIAL_DIR, "partial_rank*.jsonl"))):
        records, _, reason = _read_partial(path, fingerprint)
        if records is None:
            log(f"cannot resume from {path}: {reason}; its images are run again")
            continue
        for r in records:
            done[int(r["index"])] = r
    return done


def _open_own_file(path: str, fingerprint: str, resume: bool):
    if resume and os.path.exists(path):
        records, good, _ = _read_partial(path, fingerprint)
        if records is not None:
            with open(path, "r+b") as f:
                f.truncate(good)
            return open(path, "a", encoding="utf-8")
    header = json.dumps({"fingerprint": fingerprint}) + "\n"
    atomic_write(path, lambda f: f.write(header.encode("utf-8")), what="partial results file")
    return open(path, "a", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def inference_on_dataset(model: nn.Module, dataset: Dataset, device: Any = "cpu", num_workers: int = 0,
                         ims_per_batch: int = 1, mask_threshold: float = 0.5,
                         output_dir: Optional[str] = None, resume: bool = False, fingerprint: str = "",
                         on_image: Optional[Callable[[int, Tensor, Dict[str, Any]], None]] = None,
                         log: Optional[Callable[[str], Any]] = None, progress_stream=None) -> List[Dict[str, Any]]:
    """Run ``model`` (eval mode, ``model(images) -> list of {boxes, labels, scores[, masks]}``) on every image of
    ``dataset``, this process's shard only, and gather the records of all processes.

    Args:
        model: the detector (unwrapped, not DDP), run as it is: mixed precision comes from
            :func:`maskrcnn.engine.speed.prepare_for_inference` (``TEST.AMP``), not from this loop.
        dataset: items ``(image, target)``.
        device: where the model runs.
        num_workers, ims_per_batch: test loader settings.
        mask_threshold: cfg ``MRCNN.THRESH_BINARIZE``.
        output_dir: where partial results are saved incrementally (None: nothing saved, no resume).
        resume: continue from the partial results in ``output_dir`` whose fingerprint equals ``fingerprint``.
        fingerprint: identifies checkpoint + config + dataset.
        on_image: called as ``on_image(index, image, record)`` for every image run here (e.g. visualisation).
        log: message sink (default: the ``maskrcnn.inference`` logger).
        progress_stream: where the progress display goes (default stderr; rank 0 only).

    Returns:
        the records of all images, sorted by dataset index, on every process.
    """
    from ..data.build import build_test_loader
    from .trainer import move_to_device

    log = log if log is not None else logger.info
    device = torch.device(device)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    n = len(dataset)

    previous: Dict[int, Dict[str, Any]] = {}
    if output_dir is not None:
        if resume:
            previous = _load_previous(output_dir, fingerprint, log)
        elif rank == 0:
            for path in glob.glob(os.path.join(output_dir, PARTIAL_DIR, "partial_rank*.jsonl")):
                os.remove(path)
        os.makedirs(os.path.join(output_dir, PARTIAL_DIR), exist_ok=True)
    # Every rank must agree on what is left, even when the ranks see different files.
    done_sets = dist_utils.all_gather(sorted(i for i in previous if 0 <= i < n))
    done = set().union(*[set(d) for d in done_sets])
    remaining = [i for i in range(n) if i not in done]
    if resume and output_dir is not None:
        if done:
            log(f"resuming inference: {len(done)} of {n} images already done, {len(remaining)} to run")
        else:
            log(f"--resume: no finished images found in {os.path.join(output_dir, PARTIAL_DIR)}; running all {n}")
    dist_utils.synchronize()

    own_file = None
    if output_dir is not None:
        own_file = _open_own_file(_partial_path(output_dir, rank), fingerprint, resume)
    new: List[Dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        if remaining:
            subset = _Subset(dataset, remaining)
            loader = build_test_loader(subset, num_workers=num_workers, rank=rank, world_size=world_size,
                                       ims_per_batch=ims_per_batch)
            shard = len(loader.batch_sampler.sampler)
            bar = Progress(None, total=len(done) + len(remaining), desc="inference", unit="img",
                           stream=progress_stream, log_every=10.0, enabled=rank == 0, initial=len(done)).start()
            start = time.perf_counter()
            for images, _targets, positions in loader:
                images, _ = move_to_device(images, None, device)
                outputs = model(images)
                for image, pos, out in zip(images, positions, outputs):
                    index = remaining[int(pos)]
                    rec = prediction_record(index, dataset_image_id(dataset, index), out, mask_threshold,
                                            image_size=tuple(image.shape[-2:]),
                                            original_size=_recorded_size(dataset, index))
                    new.append(rec)
                    if own_file is not None:
                        own_file.write(json.dumps(rec) + "\n")
                        own_file.flush()
                    if on_image is not None:
                        on_image(index, image, rec)
                # Progress counts the whole job: this shard times the number of processes.
                bar.advance(len(images) * world_size)
            bar.close()
            elapsed = time.perf_counter() - start
            if shard:
                log(f"inference on {shard} images (this process) took {elapsed:.1f} s "
                    f"({elapsed / shard:.3f} s/img)")
    finally:
        if own_file is not None:
            own_file.flush()
            os.fsync(own_file.fileno())
            own_file.close()
        model.train(was_training)
    kept_previous = [r for i, r in previous.items() if i in done]
    merged: Dict[int, Dict[str, Any]] = {}
    for part in dist_utils.all_gather(kept_previous + new):
        for r in part:
            merged[int(r["index"])] = r
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"inference finished but {len(missing)} images have no results (first: {missing[:10]}); "
                           f"the partial results files may have been changed during the run")
    return [merged[i] for i in range(n)]


def records_to_coco_results(records: Iterable[Dict[str, Any]], dataset) -> Dict[str, List[Dict[str, Any]]]:
    """COCO results from records: ``{"bbox": [{image_id, category_id, bbox [x, y, w, h], score}], "segm": [...],
    "keypoints": [...]}`` (``segm`` only when the records have masks, ``keypoints`` (``[x1, y1, v1, ...]`` with the
    box's score) only when they have keypoints); labels are mapped back to the dataset's category ids."""
    cat_of = contiguous_to_category_id(dataset)
    bbox, segm, keypoints = [], [], []
    has_masks = has_keypoints = False
    for r in records:
        segms = r.get("segms")
        kps = r.get("keypoints")
        has_masks = has_masks or segms is not None
        has_keypoints = has_keypoints or kps is not None
        for k, (box, score, label) in enumerate(zip(r["boxes"], r["scores"], r["labels"])):
            if int(label) not in cat_of:
                raise ValueError(f"image {r['image_id']}: predicted label {label} has no category id; the model's "
                                 f"MODEL.NUM_CLASSES does not match the dataset's {len(cat_of)} classes")
            x1, y1, x2, y2 = (float(v) for v in box)
            common = {"image_id": int(r["image_id"]), "category_id": cat_of[int(label)], "score": float(score)}
            bbox.append(dict(common, bbox=[x1, y1, x2 - x1, y2 - y1]))
            if segms is not None:
                segm.append(dict(common, segmentation=segms[k]))
            if kps is not None:
                keypoints.append(dict(common, keypoints=kps[k]))
    out = {"bbox": bbox}
    if has_masks:
        out["segm"] = segm
    if has_keypoints:
        out["keypoints"] = keypoints
    return out


def write_coco_results(output_dir: str, results: Dict[str, List[Dict[str, Any]]]) -> Dict[str, str]:
    """Write ``<iou_type>_results.json`` files atomically; returns ``{iou_type: path}``."""
    paths = {}
    for iou_type, dets in results.items():
        path = os.path.join(output_dir, f"{iou_type}_results.json")
        text = json.dumps(dets)
        atomic_write(path, lambda f, t=text: f.write(t.encode("utf-8")), what="results file")
        paths[iou_type] = path
    return paths


def evaluate_on_dataset(model: nn.Module, dataset: Dataset, cfg, device: Any = "cpu", output_dir: Optional[str] = None,
                        num_workers: int = 0, resume: bool = False, fingerprint: str = "",
                        on_image: Optional[Callable[[int, Tensor, Dict[str, Any]], None]] = None,
                        log: Optional[Callable[[str], Any]] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """Inference, COCO results (``bbox_results.json``, ``segm_results.json``), COCO evaluation and
    ``metrics.json`` in ``output_dir`` — what ``tools/test_net.py`` does for one dataset. The metrics are
    :func:`~maskrcnn.evaluation.coco.evaluate_coco`'s ``detailed`` ones: APs, ARs and per-category APs.

    Settings come from ``cfg``: ``TEST.IMS_PER_BATCH``, ``MRCNN.THRESH_BINARIZE``, ``TEST.KEYPOINT_OKS_SIGMAS``
    (keypoint models), and the test-time augmentation
    ``TEST.BBOX_AUG`` / ``TEST.MASK_AUG`` (:func:`maskrcnn.engine.tta.with_test_time_augmentation`, which checks
    them before any image is run). The model runs as it is otherwise: the
    ``TEST`` speed features, mixed precision (``TEST.AMP``) included, are applied beforehand by
    :func:`maskrcnn.engine.speed.prepare_for_inference` (``tools/test_net.py`` does). Returns the metrics on rank 0
    and None on the other ranks.
    """
    from ..evaluation.coco import class_names, coco_gt_from_dataset, evaluate_coco, write_metrics
    from .tta import with_test_time_augmentation

    log = log if log is not None else logger.info
    detector = with_test_time_augmentation(model, cfg)  # the model itself without TEST.BBOX_AUG / MASK_AUG
    if detector is not model:
        runs = [("boxes", detector.bbox_augmentations), ("masks", detector.mask_augmentations),
                ("keypoints", detector.keypoint_augmentations)]
        log(f"test-time augmentation (TEST.*_AUG): the image at {detector.reference.describe()}, and "
            + "; ".join(f"for {what} also at {', '.join(a.describe() for a in augs)}" for what, augs in runs if augs))
    records = inference_on_dataset(detector, dataset, device=device, num_workers=num_workers,
                                   ims_per_batch=int(cfg.TEST.IMS_PER_BATCH),
                                   mask_threshold=float(cfg.MRCNN.THRESH_BINARIZE), output_dir=output_dir,
                                   resume=resume, fingerprint=fingerprint, on_image=on_image, log=log)
    if not dist_utils.is_main_process():
        return None
    results = records_to_coco_results(records, dataset)
    if output_dir is not None:
        for iou_type, path in write_coco_results(output_dir, results).items():
            log(f"wrote {len(results[iou_type])} {iou_type} results to {path}")
    coco_gt = coco_gt_from_dataset(dataset)
    img_ids = [int(r["image_id"]) for r in records]
    metrics = evaluate_coco(coco_gt, results, img_ids=img_ids, names=class_names(dataset), log=log, detailed=True,
                            kpt_oks_sigmas=list(cfg.TEST.KEYPOINT_OKS_SIGMAS))
    if output_dir is not None:
        path = os.path.join(output_dir, "metrics.json")
        write_metrics(path, metrics)
        log(f"wrote {path}")
    return metrics
