"""One optimiser step of one trained model, over a step's micro-batches: the machinery every trained model shares.

The policy's step (Trainer.optimizer_step) and PPO's critic step run through the same `ModelUpdate`:
  * exact accumulation: the step loss is sum(per-item losses) / items in the WHOLE step (all micro-batches, all
    ranks); gradients are synchronised on the last micro-batch only;
  * DDP averages gradients over ranks, so each backward is scaled by the world size to make that the global sum;
  * fp16 AMP through a GradScaler (an inf gradient is the scaler's business: it skips the step and lowers the
    scale); clipping to max_grad_norm;
  * the non-finite guard and `nan_policy` decide whether the update is applied; the schedule advances either way.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from rlhf_time.runtime import parallel
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.runtime.guards import NonFiniteGuard

Batch = dict[str, torch.Tensor]
# (model, batch, items in the whole step) -> (loss already divided by those items, {metric: summed value})
LossFunction = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    loss: float  # the step's loss (all micro-batches, all ranks)
    sums: dict[str, float]  # each metric the loss function returned, summed over micro-batches and ranks
    num_items: int  # loss items of the whole step
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    applied: bool  # False when the non-finite guard dropped the update


class ModelUpdate:
    """A trained model with its optimiser, schedule, GradScaler and non-finite guard.

    model: the unwrapped model (its parameters are clipped); train_model: what the forward runs (DDP/FSDP wrapper
    or the model itself).
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 guard: NonFiniteGuard, *, max_grad_norm: Optional[float], world_size: int, device: torch.device,
                 scaler: Optional[torch.amp.GradScaler] = None, autocast: Callable[[], contextlib.AbstractContextManager]
                 = contextlib.nullcontext) -> None:
        self.model, self.train_model, self.optimizer, self.scheduler = model, train_model, optimizer, scheduler
        self.guard, self.scaler, self.autocast = guard, scaler, autocast
        self.max_grad_norm, self.world_size, self.device = max_grad_norm, world_size, device

    def step(self, micro_batches: list[Batch], loss_fn: LossFunction, count_items: Callable[[Batch], int], *,
             global_step: int, run_dir: Path, on_batch: Callable[[Batch], None] = lambda batch: None) -> StepResult:
        """Forward/backward of each micro-batch, then (maybe) one update; `global_step` is the step being taken."""
        model = self.train_model
        model.train()
        num_items = int(all_reduce_sum(torch.tensor(sum(count_items(b) for b in micro_batches), device=self.device)))
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = i == len(micro_batches) - 1
            with (contextlib.nullcontext() if last else parallel.no_sync(model)), self.autocast():
                loss, metrics = loss_fn(model, batch, num_items)
            scaled = loss * self.world_size
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            sums["loss"] += loss.detach()
            for key, value in metrics.items():
                sums[key] += value.detach()
            on_batch(batch)
        totals = {key: float(all_reduce_sum(value)) for key, value in sums.items()}
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        loss = totals.pop("loss")
        applied = self.guard.allow_update(global_step, loss, None if self.scaler else grad_norm, run_dir)
        if self.scaler:
            if applied:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, totals, num_items, grad_norm, lr, applied)

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm) if parameters else torch.zeros(())
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
