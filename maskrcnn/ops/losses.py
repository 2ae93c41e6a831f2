"""Box regression loss shared by the RPN and the Fast R-CNN head."""

import torch
from torch import Tensor

_REDUCTIONS = ("none", "sum", "mean")


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0 / 9, reduction: str = "sum") -> Tensor:
    """Smooth L1 (Huber-like) loss, elementwise ``0.5 * d**2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``.

    The default ``beta = 1/9`` and ``reduction = "sum"`` are those of Detectron's RPN and box
    losses, which sum over elements and divide by the sampled batch size themselves.

    Args:
        input: predictions, any shape, floating point.
        target: same shape (no broadcasting, to catch mismatched targets) and dtype family.
        beta: transition point, ``>= 0``. ``beta == 0`` gives the plain L1 loss ``|d|``; for
            ``beta > 0`` the values equal ``torch.nn.functional.smooth_l1_loss(..., beta=beta)``.
        reduction: ``"none"`` (elementwise, same shape as ``input``), ``"sum"`` or ``"mean"``
            (mean over all elements; NaN for empty input, like PyTorch).

    Returns:
        The loss tensor (0-d unless ``reduction == "none"``); differentiable in ``input`` and ``target``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"smooth_l1_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    beta = float(beta)
    if not beta >= 0.0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    if input.shape != target.shape:
        raise ValueError(
            f"smooth_l1_loss: input and target must have the same shape, got {tuple(input.shape)} "
            f"and {tuple(target.shape)}"
        )
    abs_diff = (input - target).abs()
    if beta == 0.0:
        # The quadratic branch would divide by zero; its limit is L1.
        loss = abs_diff
    else:
        loss = torch.where(abs_diff < beta, 0.5 * abs_diff * abs_diff / beta, abs_diff - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
