"""PPO's critic: a value per token, trained with its own optimiser next to the policy.

The critic is a 1-label sequence-classification model (the shape `stage: rm` trains) whose scalar head is applied
at every position instead of only the last: V(s_t) = w . h_t (+ b), h_t the final hidden state at token t. It
starts from a reward-model folder (`value_model: FOLDER`, the default when `reward_model` is set: InstructGPT and
OpenRLHF initialise the value function from the reward model) or from the policy's own starting weights with a
new head (`value_model: policy`). It is tuned as the policy is (full, LoRA with its own adapter and head, or
frozen layers) with `critic_learning_rate`, wrapped in DDP or sharded with FSDP2 like the policy (under FSDP rank 0
loads it and the other ranks receive only their shards), and checkpointed through the stage's state as full
(unsharded) weights and optimiser state keyed by parameter name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models import apply_tuning, load_causal_lm, load_tokenizer, resolve_model_path
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import check_same_vocabulary
from rlhf_time.runtime.distributed import DistributedContext
from rlhf_time.runtime.optimization import build_optimizer, build_scheduler

log = logging.getLogger("rlhf_time")


class ValueModel(nn.Module):
    """Per-token values (B, T) float32 of a sequence-classification model: its score head on every final hidden
    state (the model's own forward would pool the last token only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def get_base_model(self) -> nn.Module:
        """The sequence-classification model inside (peft unwrapped): where FSDP finds the decoder layers."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
        return getattr(inner, inner.base_model_prefix), inner.score  # LoRA layers live inside the backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        backbone, head = self._parts()
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, T, H), after the final norm
        return head(hidden).squeeze(-1).float()  # (B, T)


def value_model_source(config: TrainingConfig) -> str:
    """Where the critic starts: value_model, else the reward model, else the policy ("policy")."""
    return config.ppo.value_model or config.rollout.reward_model or "policy"


def build_critic(config: TrainingConfig, tokenizer, family, dist: DistributedContext) -> ValueModel:
    """The trainable critic on the training device, float32 master weights, tuned with the policy's strategy
    (under FSDP: rank 0 loads it, the other ranks hold a meta skeleton until parallel.wrap_model shards it)."""
    source = value_model_source(config)
    path = resolve_model_path(config.model_name if source == "policy" else source)
    merge_adapter = False
    if source != "policy":
        if not Path(path).is_dir():
            raise RlhfTimeError(f"ppo.value_model: {source} is not a folder (a model trained with stage rm, or 'policy')")
        merge_adapter = (Path(path) / "adapter_config.json").is_file()
        if not merge_adapter:
            check_same_vocabulary(tokenizer, load_tokenizer(config, path=path), config.model_name, source)

    def build(meta: bool) -> ValueModel:
        if merge_adapter:
            model = _merged_reward_model(path, config, meta)
        else:
            # Seeded so `value_model: policy`'s new head is the same on every rank and in a resumed run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                model = load_causal_lm(config, path=path, head="reward", meta=meta)
        model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        return ValueModel(apply_tuning(model, config, family, task_type="SEQ_CLS"))

    log.info("critic: %s", source if source != "policy" else f"{config.model_name} + a new value head")
    return parallel.load_model(build, config, dist)


def _merged_reward_model(folder: str, config: TrainingConfig, meta: bool) -> nn.Module:
    """A LoRA reward-model folder (adapter + score head) merged into its base: the critic's starting weights
    (meta=True: the base's architecture on the meta device, which merging does not change)."""
    base = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    model = load_causal_lm(config, path=resolve_model_path(base), head="reward", meta=meta)
    if meta:
        return model
    from peft import PeftModel

    log.info("critic: %s (LoRA reward model on %s, merged)", folder, base)
    return PeftModel.from_pretrained(model, folder).merge_and_unload()


def critic_learning_rate(config: TrainingConfig) -> float:
    """ppo.critic_learning_rate, or the policy's learning_rate when it is None (the default). A critic far slower
    than the policy (1e-5 under a 1e-4 policy) lags its returns and PPO then barely learns: docs/stages.md#ppo."""
    rate = config.ppo.critic_learning_rate
    return config.learning_rate if rate is None else rate


class CriticOptimizer:
    """The critic's AdamW and schedule (the policy's schedule shape at critic_learning_rate). Its steps run through
    the loop's own machinery (rlhf_time.runtime.update.ModelUpdate: accumulation, GradScaler, clipping, the
    non-finite guard). state_dict is the optimiser's full state keyed by parameter name (gathered under FSDP: call
    it on every rank)."""

    def __init__(self, critic: nn.Module, config: TrainingConfig, total_steps: int) -> None:
        critic_config = config.model_copy(update={"learning_rate": critic_learning_rate(config)})
        self.critic = critic
        self.optimizer = build_optimizer(critic, critic_config)
        self.scheduler = build_scheduler(self.optimizer, critic_config, total_steps)

    def state_dict(self) -> dict[str, Any]:
        full = parallel.FullStateOptimizer(self.critic, self.optimizer).gather().state_dict()
        return {"optimizer": full, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parallel.FullStateOptimizer(self.critic, self.optimizer).load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
