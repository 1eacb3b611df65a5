"""Which sampling engine a run uses (`rollout.engine`): the name -> the class that fills the SamplingEngine protocol."""

from __future__ import annotations

from torch import nn

from rlhf_time.experience.paged_engine import TransformersPagedEngine
from rlhf_time.experience.sampler import KVCacheEngine, SamplingEngine

SAMPLING_ENGINES = {"kv_cache": KVCacheEngine, "transformers_paged": TransformersPagedEngine}


def create_sampling_engine(name: str, model: nn.Module) -> SamplingEngine:
    """The engine `name` sampling from `model` (the model being trained, unwrapped)."""
    if name not in SAMPLING_ENGINES:
        raise ValueError(f"unknown sampling engine {name!r}; valid: {', '.join(SAMPLING_ENGINES)}")
    return SAMPLING_ENGINES[name](model)
