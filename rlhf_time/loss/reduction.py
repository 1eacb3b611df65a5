"""Loss reduction, kept explicit: how per-item losses become the number that is back-propagated."""

from __future__ import annotations

from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over all elements or along `dim`; 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1.0)


def reduce(values: torch.Tensor, mask: Optional[torch.Tensor], reduction: str,
           num_items_in_batch: Optional[int | torch.Tensor] = None) -> torch.Tensor:
    """'none' -> values (zeros where masked); 'sum' -> masked sum; 'mean' -> masked mean,
    or masked sum / num_items_in_batch when given (exact over micro-batches and ranks)."""
    if mask is not None:
        values = values * mask.to(values.dtype)
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    count = mask.sum() if mask is not None else torch.tensor(values.numel())
    return total / count.to(values.dtype).clamp(min=1.0)
