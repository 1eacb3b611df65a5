"""Data parallelism for the loop: DDP or FSDP2 wrapping, gradient-sync control, and full-state save/load.

The loop stays the same for one process, DDP and FSDP; what differs is here:
- DDP replicates the model; optimizer state is identical on every rank, so rank 0 writes it and all ranks load it.
- FSDP2 (`fully_shard` per decoder layer, then the root) shards parameters, gradients and optimizer state. A
  checkpoint still holds the FULL model (one standard HF folder) and the FULL optimizer state, gathered on all
  ranks and written by rank 0, so a run saved on N ranks resumes on M ranks (or one process).
  The optimizer state is saved in the same by-name format for every strategy (FullStateOptimizer).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rlhf_time.config import TrainingConfig
from rlhf_time.models.families import decoder_layers
from rlhf_time.trainer import checkpoint as ckpt
from rlhf_time.trainer.distributed import DistributedContext

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def wrap_model(model: nn.Module, config: TrainingConfig, dist: DistributedContext) -> nn.Module:
    """The module the loop trains: DDP around `model` (distributed=auto|ddp) or `model` itself sharded in place (fsdp)."""
    if config.distributed == "fsdp":
        return shard_model(model, config)
    # Frozen parameters (LoRA, freeze_layers) are skipped by DDP; every trainable one gets a gradient each
    # step, so find_unused_parameters (an extra graph traversal per step) is not needed.
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_model(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """FSDP2 in place: every decoder layer, then the root."""
    options: dict[str, Any] = {}
    if config.use_amp:  # bf16 compute and all-gathers, fp32 gradient reduction and master weights
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)  # the root: embeddings, final norm, lm_head (tied or not)
    return model


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def no_sync(model: nn.Module):
    """Skip the gradient reduction of a non-final micro-batch (gradients accumulate locally until the last one)."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------------- FSDP checkpoints
class GatheredModel:
    """What checkpoint.py saves under FSDP: `save_pretrained` writes the full weights gathered from every rank."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state_dict = get_model_state_dict(model, options=_FULL)  # collective: call on every rank

    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        self.model.save_pretrained(folder, state_dict=self.state_dict, **kwargs)


class FullStateOptimizer:
    """The optimizer as checkpoint.py sees it: full (unsharded) state keyed by parameter name.

    One format for one process, DDP and FSDP, so a checkpoint from N ranks (either strategy) resumes on M.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def gather(self) -> "FullStateOptimizer":
        """Gather the full state now (collective: every rank calls this); `state_dict()` then returns it."""
        self._gathered = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self._gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank passes the full state and keeps its own shard."""
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """FSDP: load a checkpoint's full weights (model or LoRA adapter) into the sharded parameters.

    checkpoint.load_model_weights (and peft's adapter loader inside it) end in `model.load_state_dict` with full
    tensors; under FSDP that call is routed to `set_model_state_dict`, which copies each rank's shard.
    """

    def load_state_dict(state: dict[str, torch.Tensor], strict: bool = True, **_: Any):
        # set_model_state_dict shards `state`, then calls the real load_state_dict: unshadow it meanwhile.
        del model.load_state_dict
        try:
            return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        finally:
            model.load_state_dict = load_state_dict

    model.load_state_dict = load_state_dict  # an instance attribute shadows nn.Module.load_state_dict
    try:
        ckpt.load_model_weights(model, folder)
    finally:
        del model.load_state_dict
