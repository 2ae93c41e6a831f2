"""Random sampling of a fixed-size, class-balanced minibatch of anchors or RoIs per image."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor


class BalancedPositiveNegativeSampler:
    """Pick at most ``batch_size_per_image`` elements per image, a ``positive_fraction`` of them positive.

    As in Detectron / torchvision: the number of positives is
    ``min(#positives, int(batch_size_per_image * positive_fraction))`` and the remainder of the
    batch is filled with negatives, ``min(#negatives, batch_size_per_image - #positives taken)``;
    both subsets are drawn uniformly at random without replacement.

    Args:
        batch_size_per_image: number of elements to sample per image (>= 0).
        positive_fraction: target fraction of positives in the sample, in ``[0, 1]``.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if isinstance(batch_size_per_image, bool) or int(batch_size_per_image) != batch_size_per_image:
            raise ValueError(
                "BalancedPositiveNegativeSampler: batch_size_per_image must be an integer, "
                f"got {batch_size_per_image!r}"
            )
        if batch_size_per_image < 0:
            raise ValueError(
                f"BalancedPositiveNegativeSampler: batch_size_per_image must be >= 0, got {batch_size_per_image}"
            )
        if not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(
                f"BalancedPositiveNegativeSampler: positive_fraction must be in [0, 1], got {positive_fraction!r}"
            )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(
        self, labels: List[Tensor], generator: Optional[torch.Generator] = None
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Sample each image's elements.

        Args:
            labels: one 1-D integer tensor per image; ``>= 1`` positive, ``0`` negative, ``-1``
                (or any other negative value) ignored, never sampled.
            generator: optional ``torch.Generator`` (on the labels' device) for reproducible
                draws; by default the global RNG of that device is used. The draws are made in
                the same order as torchvision's sampler (per image: positives, then negatives),
                so both give the same subsets from the same RNG state.

        Returns:
            ``(pos_masks, neg_masks)``: two lists with one bool tensor per image, shaped and
            placed like the corresponding ``labels`` tensor, True where the element was sampled
            as a positive (resp. negative). The two masks of an image are disjoint.
        """
        if isinstance(labels, Tensor):
            raise TypeError("BalancedPositiveNegativeSampler: labels must be a list of per-image tensors, got a Tensor")
        pos_masks: List[Tensor] = []
        neg_masks: List[Tensor] = []
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        for i, labels_per_image in enumerate(labels):
            if labels_per_image.dim() != 1:
                raise ValueError(
                    f"BalancedPositiveNegativeSampler: labels[{i}] must be 1-D, "
                    f"got shape {tuple(labels_per_image.shape)}"
                )
            if labels_per_image.is_floating_point() or labels_per_image.is_complex():
                raise TypeError(
                    f"BalancedPositiveNegativeSampler: labels[{i}] must be an integer tensor, "
                    f"got {labels_per_image.dtype}"
                )
            positive = torch.nonzero(labels_per_image >= 1).squeeze(1)
            negative = torch.nonzero(labels_per_image == 0).squeeze(1)

            num_pos = min(positive.numel(), max_pos)
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)

            device = labels_per_image.device
            pos_pick = positive[torch.randperm(positive.numel(), device=device, generator=generator)[:num_pos]]
            neg_pick = negative[torch.randperm(negative.numel(), device=device, generator=generator)[:num_neg]]

            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            pos_mask[pos_pick] = True
            neg_mask[neg_pick] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )
