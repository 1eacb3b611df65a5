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
import itertools
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
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
from rlhf_time.runtime import checkpoint as ckpt
from rlhf_time.runtime.distributed import DistributedContext

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
    """FSDP2 in place: every decoder layer, then the root; a meta-device skeleton from load_model then gets its
    shards from rank 0's weights."""
    options: dict[str, Any] = {}
    if config.use_amp:  # bf16 compute and all-gathers, fp32 gradient reduction and master weights
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if config.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)  # the root: embeddings, final norm, lm_head (tied or not)
    rank0 = model.__dict__.pop("_rank0_weights", None)
    if rank0 is not None:
        _fill_shards_from_rank0(model, rank0.model, _shard_device(config))
    return model


# ------------------------------------------------------------------------------- memory-lean FSDP loading
class _Rank0Weights:
    """Rank 0's loaded model (None on other ranks), kept with a meta skeleton until its shards are filled.
    A deepcopy of the skeleton (DPO's reference) shares it: both start from the same weights."""

    def __init__(self, model: Optional[nn.Module]) -> None:
        self.model = model

    def __deepcopy__(self, memo: dict) -> "_Rank0Weights":
        return self


def load_model(build: Callable[[bool], nn.Module], config: TrainingConfig, dist: DistributedContext) -> nn.Module:
    """The model to train. `build(meta)` loads it (meta=False) or builds the same modules on the meta device.

    One process and DDP: build(False) on the training device, as always. FSDP: no rank holds a full copy on its
    device. Rank 0 loads the model into host memory exactly as one process would (same weights, same random
    init of new heads and LoRA); every rank builds a meta skeleton, which shard_model shards and then fills, each
    rank receiving only its shard of each tensor from rank 0. Per rank, device memory peaks at its shards plus
    one full tensor in flight; ranks other than 0 never hold more in any memory.
    """
    if not (dist.enabled and config.distributed == "fsdp"):
        return build(False).to(dist.device)
    loaded = build(False) if dist.is_main else None
    # Every rank continues from rank 0's random state, as if each had run the (seeded) loading itself.
    state = [torch.get_rng_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        skeleton = build(True)
    skeleton.__dict__["_rank0_weights"] = _Rank0Weights(loaded)
    return skeleton


def _shard_device(config: TrainingConfig) -> torch.device:
    if config.fsdp_cpu_offload or torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


@torch.no_grad()
def _fill_shards_from_rank0(model: nn.Module, loaded: Optional[nn.Module], device: torch.device) -> None:
    """Allocate the sharded skeleton's storage, then fill it tensor by tensor: rank 0 scatters each parameter
    (every rank receives only its shard, written in place, so tied weights stay tied) and broadcasts each buffer
    (rotary tables are not in the state dict). Peak per rank: its shards plus one full tensor in flight."""
    model.to_empty(device=device)
    is_main = torch.distributed.get_rank() == 0
    source = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())} if is_main else {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        full = source[name].detach().to(device) if is_main else torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        if isinstance(tensor, DTensor):
            # src_data_rank=0 (the default): rank 0's data is scattered, the other ranks' `full` only has the shape.
            tensor.to_local().copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements).to_local())
        else:
            torch.distributed.broadcast(full, src=0)
            tensor.copy_(full)


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
    """What checkpoint.py saves under FSDP: `save_pretrained` writes the full weights gathered from every rank
    (or `state_dict`, full weights already gathered, e.g. of a module inside the sharded root)."""

    def __init__(self, model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.model = model
        # Gathering is a collective: call on every rank.
        self.state_dict = state_dict if state_dict is not None else get_model_state_dict(model, options=_FULL)

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


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on the CPU, keyed by parameter name; under FSDP gathered from every rank (a
    collective: call it on every rank)."""
    if is_fsdp(model):
        return get_model_state_dict(model, options=_FULL)
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights saved by full_weights (every rank passes all of them; under FSDP each keeps its shard)."""
    if is_fsdp(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


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
