"""Stand-in models and datasets for the engine tests: small, deterministic, with Generalized_RCNN's interfaces.

``ToyDetector`` is trained like the real model (``model(images, targets) -> dict of scalar losses``) but every loss
is a mean of per-image terms, so a batch of ``2B`` images and the average of two batches of ``B`` give the same
gradient (up to float rounding): what data-parallel and gradient-accumulation equivalence needs.

``OracleDetector`` answers, in eval mode, the ground truth of the image it is shown (read from a dataset), which
makes COCO evaluation of its output exactly 100 AP.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset


class ToyDetector(nn.Module):
    """Conv + GroupNorm body, linear heads; losses regress per-image statistics of the targets.

    ``nan_at``: forward call numbers (0-based, training calls only) whose ``loss_b`` is NaN.
    """

    def __init__(self, width: int = 4, nan_at: Optional[List[int]] = None):
        super().__init__()
        self.body = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head_a = nn.Linear(width, 1)
        self.head_b = nn.Linear(width, 2)
        self.nan_at = set(nan_at or [])
        self.calls = 0

    def features(self, images: List[Tensor]) -> Tensor:
        return torch.stack([F.relu(self.norm(self.body(im[None]))).mean(dim=(2, 3))[0] for im in images])

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        feats = self.features(images)
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0)} for _ in images]
        n_obj = torch.stack([t["labels"].numel() * torch.ones(()) for t in targets]).to(feats)
        box_mean = torch.stack([t["boxes"].float().mean() / 128.0 if t["boxes"].numel() else torch.zeros(())
                                for t in targets]).to(feats)
        loss_a = ((self.head_a(feats)[:, 0] - n_obj) ** 2).mean()
        b = self.head_b(feats)
        loss_b = ((b[:, 0] - box_mean) ** 2 + (b[:, 1] + 0.5) ** 2).mean()
        if self.calls in self.nan_at:
            loss_b = loss_b * float("nan")
        self.calls += 1
        return {"loss_a": loss_a, "loss_b": loss_b}


class IndexedImages(Dataset):
    """Wraps a dataset; pixel (0, 0, 0) of each image is replaced by a code of the item's index, so that a model
    can tell which item it is shown (images keep their content otherwise)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        for attr in ("classes", "contiguous_to_category_id", "get_image_info"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        image = image.clone()
        image[0, 0, 0] = (i + 1) / 1024.0
        return image, target


class OracleDetector(nn.Module):
    """Eval: returns the ground truth of the image shown (score 1, masks as 0/1 probabilities), read from
    ``dataset``, an :class:`IndexedImages`. ``calls`` counts the images seen."""

    def __init__(self, dataset: IndexedImages, shift: float = 0.0):
        super().__init__()
        self.dataset = dataset
        self.shift = float(shift)
        self.calls = 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images: List[Tensor], targets=None):
        out = []
        for im in images:
            index = int(round(float(im[0, 0, 0]) * 1024.0)) - 1
            _, t = self.dataset.dataset[index]
            n = t["labels"].numel()
            boxes = t["boxes"].float() + self.shift
            out.append({"boxes": boxes, "labels": t["labels"], "scores": torch.ones(n),
                        "masks": t["masks"].float()[:, None]})
            self.calls += 1
        return out
