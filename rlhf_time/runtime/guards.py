"""Non-finite guards: no optimiser update from a NaN/inf loss or gradient norm, and no non-finite weights saved.

The loss alone is not enough: a finite loss can still give an infinite gradient, and the update of a huge
gradient (or learning rate) gives non-finite weights that every later step, and every resume, inherits. So:
  * before `optimizer.step()` the step's loss and global gradient norm must be finite, else the policy decides:
    `stop` raises (naming the last good checkpoint), `skip_step` drops the update and stops after N in a row;
  * before any checkpoint or final model is written, every weight must be finite (checked on every rank).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from rlhf_time.errors import RlhfTimeError
from rlhf_time.runtime.checkpoint import list_checkpoints
from rlhf_time.runtime.distributed import all_reduce_sum

log = logging.getLogger("rlhf_time")


class NonFiniteGuard:
    """Decides, once per optimiser step, whether its update may be applied (same decision on every rank)."""

    def __init__(self, policy: str, max_consecutive_skips: int, subject: str = "") -> None:
        self.policy = policy
        self.subject = subject  # what is updated when it is not the policy, e.g. "critic"
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skipped_steps = 0

    def allow_update(self, step: int, loss: float, grad_norm: Optional[float], run_dir: Path) -> bool:
        """True when the update of `step` may be applied. grad_norm None: not checked (fp16's scaler skips inf)."""
        problem = describe_non_finite(loss, grad_norm)
        if problem is None:
            self.consecutive_skips = 0
            return True
        problem = f"{self.subject}: {problem}" if self.subject else problem
        hint = (f"Last good checkpoint: {last_checkpoint(run_dir) or 'none'}. "
                "Try a lower learning_rate, max_grad_norm=1.0 or use_amp=false.")
        if self.policy == "stop":
            raise RlhfTimeError(f"{problem} at step {step}; weights were not updated (nan_policy=stop). {hint}")
        self.consecutive_skips += 1
        self.skipped_steps += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise RlhfTimeError(f"{problem} at step {step}: {self.consecutive_skips} consecutive steps skipped "
                                f"(nan_policy=skip_step, nan_max_consecutive_skips={self.max_consecutive_skips}). {hint}")
        log.warning("step %d: %s; update skipped (nan_policy=skip_step, %d in a row)", step, problem,
                    self.consecutive_skips)
        return False

    def state_dict(self) -> dict[str, int]:
        """The skip counts, checkpointed so a resumed run stops after the same number of consecutive skips."""
        return {"consecutive_skips": self.consecutive_skips, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def describe_non_finite(loss: float, grad_norm: Optional[float]) -> Optional[str]:
    """'non-finite loss (nan)' / 'non-finite gradient norm (inf)', or None when both are finite."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    return None


def count_non_finite_parameters(model: nn.Module) -> int:
    """How many parameter tensors hold a NaN or inf, summed over ranks (FSDP shards are checked where they live)."""
    # A tensor's sum is finite exactly when all its elements are (short of a float32 overflow past 3e38, which
    # only broken weights reach): one reduction per tensor and no boolean copy of the model.
    sums = []
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter  # DTensor under FSDP2
        sums.append(local.detach().sum(dtype=torch.float32))
    if not sums:
        return 0
    count = (~torch.isfinite(torch.stack(sums))).sum()
    if dist.is_initialized() and dist.get_backend() == "nccl":  # CPU-offloaded shards: NCCL reduces on the GPU
        count = count.to(torch.device("cuda", torch.cuda.current_device()))
    return int(all_reduce_sum(count))  # one device sync, not one per tensor


def require_finite_weights(model: nn.Module, target: Path, step: int, run_dir: Path) -> None:
    """Refuse to write `target` from non-finite weights (call on every rank: it is a collective under torchrun)."""
    bad = count_non_finite_parameters(model)
    if bad:
        raise RlhfTimeError(
            f"{bad} weight tensor(s) hold NaN/inf after step {step}; {target} was not written. "
            f"Last good checkpoint: {last_checkpoint(run_dir) or 'none'}. Try a lower learning_rate or max_grad_norm=1.0."
        )


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint of the run: the last good one, since non-finite weights are never saved."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
