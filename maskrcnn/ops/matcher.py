"""Assignment of predictions (anchors, proposals) to ground-truth elements by match quality.

The rule is the one of Detectron / torchvision: each prediction takes the ground truth with the
highest quality (usually IoU); depending on that quality it is a match (``>= high_threshold``),
"between thresholds" (``[low_threshold, high_threshold)``) or "below the low threshold".
Optionally, every ground truth keeps its best prediction(s) even when their quality is low.
"""

import torch
from torch import Tensor


class Matcher:
    """Match each prediction to at most one ground-truth element.

    Args:
        high_threshold: qualities ``>= high_threshold`` are matches.
        low_threshold: qualities in ``[low_threshold, high_threshold)`` are labelled
            :attr:`BETWEEN_THRESHOLDS`, qualities ``< low_threshold`` :attr:`BELOW_LOW_THRESHOLD`.
            Must be ``<= high_threshold`` (equal thresholds give no "between" band).
        allow_low_quality_matches: if True, for every ground truth the predictions with the
            highest quality for it (all of them when there are ties) are given back their
            best match even when it falls below ``high_threshold``. As in Detectron and
            torchvision, such a prediction gets its own argmax ground truth, which may be a
            different ground truth than the one it was restored for. A ground truth whose
            quality is 0 against every prediction ties with all of them and so restores every
            prediction to its argmax; callers should drop degenerate (zero-area) ground truth.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        high_threshold = float(high_threshold)
        low_threshold = float(low_threshold)
        if low_threshold > high_threshold:
            raise ValueError(
                f"Matcher: low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})"
            )
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """Assign predictions to ground truth.

        Args:
            match_quality_matrix: ``(G, P)`` float tensor, quality of each (ground truth,
                prediction) pair, e.g. ``box_iou(gt_boxes, anchors)``.

        Returns:
            ``(P,)`` int64 tensor on the matrix's device: the matched ground-truth index in
            ``[0, G)``, or :attr:`BELOW_LOW_THRESHOLD` (-1) / :attr:`BETWEEN_THRESHOLDS` (-2).
            With ``G == 0`` (an image without objects) every prediction is
            :attr:`BELOW_LOW_THRESHOLD`, so that the whole image serves as negatives;
            with ``P == 0`` the result is empty.
        """
        if not isinstance(match_quality_matrix, Tensor) or match_quality_matrix.dim() != 2:
            shape = tuple(match_quality_matrix.shape) if isinstance(match_quality_matrix, Tensor) else None
            raise ValueError(
                f"Matcher: match_quality_matrix must be a 2-D (G, P) tensor, got "
                f"{type(match_quality_matrix).__name__} with shape {shape}"
            )
        num_gt, num_pred = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0 or num_pred == 0:
            return torch.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=device)

        best_quality, best_gt = match_quality_matrix.max(dim=0)
        matches = best_gt.clone()
        matches[best_quality < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_quality >= self.low_threshold) & (best_quality < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            # Without this, a ground truth whose best IoU with any anchor is below the high
            # threshold (small or oddly shaped objects) would get no positive at all.
            best_per_gt = match_quality_matrix.max(dim=1).values
            is_best_for_some_gt = (match_quality_matrix == best_per_gt[:, None]).any(dim=0)
            matches = torch.where(is_best_for_some_gt, best_gt, matches)
        return matches

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )
