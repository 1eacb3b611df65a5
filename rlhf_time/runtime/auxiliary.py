"""Auxiliary models of a stage (DPO's reference, a KD teacher, a reward model): declared by the stage, built here.

A stage declares what it needs with `AuxiliaryModel`s; the loop builds them once, in one place and one way:
loaded (or copied from the still-untrained policy), checked against the policy's vocabulary when asked, moved to
the device, cast to the AMP dtype when asked, frozen (eval mode, no gradients, never in the optimizer), and sharded
under FSDP exactly as the policy is. A model loaded from a path under FSDP is loaded as the policy is
(parallel.load_model): rank 0 reads it into host memory, every other rank builds a meta-device skeleton and only
ever receives its own shards when the loop shards it, so no rank but 0 holds a full copy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf_time.models.checks import require_reward_model, require_safetensors
from rlhf_time.models.loading import merge_lora_adapter, require_model_source
from rlhf_time.runtime import parallel
from rlhf_time.runtime.distributed import DistributedContext

log = logging.getLogger("rlhf_time")


@dataclass(frozen=True)
class AuxiliaryModel:
    """One frozen model a stage needs besides the policy.

    name:       key in `trainer.aux` ("reference", "teacher", "reward", ...).
    source:     folder or hub id to load; None = a frozen copy of the initial policy (taken before any update and
                before the policy is sharded).
    adapter:    a LoRA adapter folder applied to `source` and merged (frozen models need no separate adapter).
    head:       "causal_lm" or "reward" (1-label sequence classification).
    field:      the config field that names `source` (ref_model, teacher_model, ...), for messages.
    same_vocabulary: check the model's tokenizer has the policy's token-to-id map before loading its weights.
    cast_to_amp_dtype: keep the weights in the AMP dtype (bf16) when use_amp is on: half the memory, and a frozen
                model has no master weights to keep in float32.
    """

    name: str
    source: Optional[str] = None
    adapter: Optional[str] = None
    head: str = "causal_lm"
    field: Optional[str] = None
    same_vocabulary: bool = False
    cast_to_amp_dtype: bool = False


def check_auxiliary_sources(specs: list[AuxiliaryModel], config: TrainingConfig) -> None:
    """Every model a stage will load exists (or is a reachable hub id) and, as a reward head, is a trained reward
    model: checked before the policy loads, each failure naming its config field."""
    for spec in specs:
        if spec.source is None:
            continue
        field = spec.field or spec.name
        require_model_source(spec.source, field, config.model_source)
        require_safetensors(spec.source, field)
        if spec.head == "reward":
            require_reward_model(spec.source, field, needed_by=f"stage {config.stage}")


def build_auxiliary_model(spec: AuxiliaryModel, policy: nn.Module, tokenizer, config: TrainingConfig,
                          dist: DistributedContext, amp_dtype: Optional[torch.dtype]) -> nn.Module:
    """The frozen model `spec` declares, on this rank's device, or -- under FSDP -- a meta skeleton that the loop's
    parallel.shard_model fills with this rank's shards (as it does the policy)."""
    if spec.source is None:
        model = copy.deepcopy(policy)  # under FSDP a skeleton sharing the policy's rank-0 weights
    else:
        if spec.same_vocabulary:
            check_same_vocabulary(tokenizer, load_tokenizer(config, path=resolve_model_path(spec.source)),
                                  config.model_name, spec.source)
        # Cast while loading, so rank 0's weights and the skeletons agree on the dtype the shards travel in.
        model = parallel.load_model(lambda meta: _load(spec, config, meta, amp_dtype), config, dist)
        if spec.same_vocabulary:
            check_rows_cover_tokenizer(model, tokenizer, spec.field or spec.name, spec.source)
        log.info("%s model: %s%s", spec.name, spec.source, f" + adapter {spec.adapter}" if spec.adapter else "")
    if not any(p.is_meta for p in model.parameters()):  # an FSDP meta skeleton gets its shards when sharded
        model = model.to(dist.device)
    if spec.cast_to_amp_dtype and amp_dtype is not None:
        model = model.to(amp_dtype)
    return model.eval().requires_grad_(False)


def _load(spec: AuxiliaryModel, config: TrainingConfig, meta: bool, amp_dtype: Optional[torch.dtype]) -> nn.Module:
    """The model at spec.source (+ its adapter merged), or with meta=True the same modules on the meta device
    (a merged adapter leaves the architecture unchanged, so the skeleton needs no adapter)."""
    model = load_causal_lm(config, path=resolve_model_path(spec.source), head=spec.head, meta=meta)
    if spec.adapter and not meta:
        model = merge_lora_adapter(model, spec.adapter)
    return model.to(amp_dtype) if spec.cast_to_amp_dtype and amp_dtype is not None else model


def check_same_vocabulary(policy_tokenizer, other_tokenizer, policy_name: str, other_name: str) -> None:
    """Distillation and references compare logits token by token: both sides must map the same text to the same ids.

    A model whose embedding matrix is padded beyond its tokenizer is fine; only the tokenizers are compared.
    """
    mine, theirs = policy_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if mine == theirs:
        return
    differing = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
    raise RlhfTimeError(
        f"{other_name} and {policy_name} do not share a vocabulary ({len(theirs)} vs {len(mine)} tokens; e.g. "
        f"{', '.join(f'{token!r}={index}' for token, index in differing)} differ): use a teacher/reference of the "
        f"same tokenizer family"
    )


def check_rows_cover_tokenizer(model: nn.Module, tokenizer, field: str, source: str) -> None:
    """A model compared token by token needs a logit for every id the shared tokenizer can produce; fewer rows
    than tokens would fail mid-step with a size mismatch (a meta skeleton has the shapes too)."""
    rows = min(module.weight.shape[0] for module in (model.get_input_embeddings(), model.get_output_embeddings())
               if module is not None)
    if rows < len(tokenizer):
        raise RlhfTimeError(f"{field} {source}: its embedding has {rows} rows, fewer than the {len(tokenizer)} tokens "
                            f"of the tokenizer it shares with the policy; use a model of the same vocabulary size")
