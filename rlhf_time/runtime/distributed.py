"""torch.distributed set-up from torchrun's environment, and the few collective helpers the loop needs."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None) -> DistributedContext:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU); a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        # A clean exit on every rank; when one rank fails, torchrun ends the others (see README, "Multi-GPU and multi-node").
        atexit.register(destroy_distributed)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=resolved)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def destroy_distributed() -> None:
    """Leave the process group and stop its threads before the interpreter shuts down (run at exit).

    destroy_process_group() alone does not stop gloo's worker threads: they end only when the last reference to the
    group goes, and FSDP's device meshes, kept in DTensor's caches and in reference cycles, outlive the trainer. A
    gloo thread still running while Python finalises dies when it takes the GIL (to free a finished collective's
    tensors), in a C++ destructor: "terminate called without an active exception", SIGABRT. So the caches and
    cycles go first, then the group, and its threads are joined here, while Python is still whole.
    """
    try:
        _clear_dtensor_caches()  # private torch caches: if a torch release moves them, still leave the group
    finally:
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # a group another owner destroyed earlier may have had its last reference in a cycle


def _clear_dtensor_caches() -> None:
    """Drop DTensor's memoised sharding plans; each holds the DeviceMesh it was made for, and with it the group."""
    if "torch.distributed.tensor" not in sys.modules:  # never imported: no DTensor, no cache
        return
    from torch.distributed.tensor import _collective_utils, _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()


@contextlib.contextmanager
def main_rank_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. rank 0 builds a cache the others then read)."""
    if not _is_main():
        barrier()
    yield
    if _is_main():
        barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
