"""Loss reduction, kept explicit: how per-item losses become the number that is back-propagated."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_time.loss.errors import check_choice

REDUCTIONS = ("mean", "sum", "none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over all elements or along `dim`; 0 where the mask is empty.

    Masked-out entries are replaced, not multiplied, so a NaN/inf at a padded position cannot leak in.
    """
    weights = mask.to(values.dtype)
    weighted = torch.where(mask != 0, values * weights, torch.zeros_like(values))
    total = weighted.sum() if dim is None else weighted.sum(dim=dim)
    count = weights.sum() if dim is None else weights.sum(dim=dim)
    return total / count.clamp(min=1.0)


def reduce(values: torch.Tensor, mask: Optional[torch.Tensor], reduction: str,
           num_items_in_batch: Optional[int | torch.Tensor] = None) -> torch.Tensor:
    """'none' -> values (zeros where masked); 'sum' -> masked sum; 'mean' -> masked mean,
    or masked sum / num_items_in_batch when given (exact over micro-batches and ranks)."""
    check_choice("reduction", reduction, REDUCTIONS)
    if mask is not None:
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:  # a step without any target gives 0, not 0 / 0
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(values.dtype).clamp(min=1.0)
        return total / max(num_items_in_batch, 1)
    count = mask.sum() if mask is not None else torch.tensor(values.numel())
    return total / count.to(values.dtype).clamp(min=1.0)
