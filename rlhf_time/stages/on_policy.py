"""What the on-policy stages (GRPO, PPO) share: prompt-only data, micro-batches of prompt indices that prepare_step
turns into experience through the one path of rlhf_time.experience (collect_experience: sample -> score ->
metrics), and the pieces that experience is made of:

- sampling through the trainer's sampling engine (rlhf_time.experience.sampler), from an RNG that is a pure
  function of (seed, step, rank, micro-batch);
- scoring with the reward functions and/or a reward-model folder (rlhf_time.experience.rewards; the reward model
  lives in the stage contract's model slot: device, AMP dtype, FSDP sharding);
- the log-probs of the sampled tokens by the training forward (policy) and by the frozen initial policy
  (reference; under LoRA the adapter-disabled policy), from final hidden states with only completion positions
  projected to the vocabulary;
- evaluation as the mean reward of greedy completions of the eval prompts, and samples in completions.jsonl.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from rlhf_time.data.prompts import PromptDataset, load_prompt_dataset
from rlhf_time.errors import RlhfTimeError
from rlhf_time.agents import load_tools, tool_schema
from rlhf_time.experience.agent_loop import AgentLoop
from rlhf_time.experience.environments import load_environment
from rlhf_time.experience.experience import Experience, collect, experience_metrics, score
from rlhf_time.experience.rewards import RewardModelReward, RewardScorer, load_reward_function
from rlhf_time.experience.sampler import Rollout, SamplingParams, sampling_generator
from rlhf_time.loss import chunked_token_logps, token_entropy, token_logps
from rlhf_time.models.checks import require_reward_model
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.runtime.loop import Trainer

SAMPLES_LOGGED = 4  # prompts written to completions.jsonl every logging_steps


class PromptTrainer(Trainer):
    """Base of the stages that generate their own training sequences from prompts.

    Subclasses say whether they need the reference (`needs_reference`) and fill prepare_step / update /
    compute_loss; `reward_funcs` are callables or specs as in rlhf_time.experience.rewards; `tools` functions (or
    specs) the policy may call, `environment` a class (or spec) as in rlhf_time.experience.environments: either
    makes every rollout a multi-turn episode (rlhf_time.experience.agent_loop).
    """

    data_kind = "prompt"
    model_head = "causal_lm"
    default_metric_for_best_model = "eval_reward"  # there is no eval loss: greedy completions' mean reward

    def __init__(self, config, reward_funcs: Optional[Sequence] = None, *, tools: Optional[Sequence] = None,
                 environment=None) -> None:
        for spec in reward_funcs if reward_funcs is not None else config.rollout.reward_funcs:
            load_reward_function(spec)  # a bad reward function fails before any model is loaded
        environment = environment if environment is not None else config.rollout.environment
        if environment is not None:
            environment = load_environment(environment)  # as bad reward functions: before any model is loaded
        tools = load_tools(tools if tools is not None else config.tools)
        if (environment is not None or tools) and config.distributed == "fsdp":
            raise RlhfTimeError("tools and environments run episodes whose number of turns differs between ranks, "
                                "while FSDP's ranks must run the same forwards: use distributed: ddp")
        self.tool_schemas = [tool_schema(fn) for fn in tools] or None  # prompts list them (records may list their own)
        if config.rollout.reward_model:  # an SFT folder would score with a random head: refuse it before any model loads
            require_reward_model(config.rollout.reward_model, "rollout.reward_model", needed_by=f"stage {config.stage}")
        super().__init__(config)
        disable_dropout(self.model)
        reward_model = self._reward_model_reward() if config.rollout.reward_model else None
        self.agent = AgentLoop.from_config(config, self.tokenizer, environment, tools)  # None: one reply per prompt
        self.rewards = RewardScorer.from_config(config, reward_funcs, reward_model=reward_model,
                                                environment=self.agent.environment_name if self.agent else None)

    # ----------------------------------------------------------------------------------- what it needs
    def needs_reference(self) -> bool:
        """Whether the stage reads the reference's log-probs (GRPO: only with a KL term; PPO: always)."""
        return True

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        config, models = self.config, []
        if self.needs_reference() and not config.use_lora:  # with LoRA the reference is the adapter-disabled policy
            models.append(AuxiliaryModel("reference"))
        if config.rollout.reward_model and not _is_adapter_folder(config.rollout.reward_model):
            models.append(AuxiliaryModel("reward", source=config.rollout.reward_model, field="rollout.reward_model", head="reward",
                                         cast_to_amp_dtype=True))
        return models

    def _reward_model_reward(self) -> RewardModelReward:
        """The reward model as one more reward, scored with its own tokenizer and saved layout; a LoRA reward-model
        folder (base + adapter + score head) is loaded whole by rlhf_time.inference."""
        folder = self.config.rollout.reward_model
        if "reward" not in self.aux:
            return RewardModelReward.from_folder(folder, device=self.device)
        from rlhf_time.config import TrainingConfig
        from rlhf_time.inference import INFERENCE_KEYS, InferenceModel, saved_config
        from rlhf_time.models import load_tokenizer

        stored = saved_config(folder)
        layout = TrainingConfig(**{k: stored[k] for k in INFERENCE_KEYS if k in stored}, model_name=folder)
        tokenizer = load_tokenizer(layout)
        model = self.aux["reward"]
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
        return RewardModelReward(InferenceModel(model, tokenizer, layout, head="reward"))

    # -------------------------------------------------------------------------------------------- data
    def load_dataset(self, path: str, max_samples: Optional[int]) -> PromptDataset:
        return load_prompt_dataset(path, self.tokenizer, self.config, max_samples=max_samples, tools=self.tool_schemas)

    def collate(self, indices: list[int], dataset: PromptDataset) -> dict[str, torch.Tensor]:
        """Prompt indices only: the tensors the loss trains on are made in prepare_step, which gets the dataset."""
        return {"prompt_index": torch.tensor(indices, dtype=torch.long)}

    # ------------------------------------------------------------------------------- sampling, scoring
    def stop_token_ids(self) -> list[int]:
        return self.inference.stop_token_ids()

    def sampling_params(self, *, greedy: bool) -> SamplingParams:
        config = self.config
        return SamplingParams(max_new_tokens=config.rollout.max_completion_length,
                              pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=tuple(self.stop_token_ids()),
                              do_sample=not greedy, temperature=config.temperature, top_p=config.top_p,
                              top_k=config.top_k,
                              stop_early=not parallel.is_fsdp(self.model))  # FSDP ranks must run the same forwards

    def sample_rollout(self, prompt_ids: list[list[int]], *, num_samples: int = 1, greedy: bool,
                       generator: Optional[torch.Generator]) -> Rollout:
        """num_samples completions of each prompt by the current policy, through the trainer's sampling engine
        (tests override this to inject completions)."""
        with self._autocast():
            return self.sampling_engine.sample(prompt_ids, self.sampling_params(greedy=greedy),
                                               num_samples=num_samples, generator=generator)

    def sample_prompts(self, dataset: PromptDataset, indices: list[int], *, num_samples: int = 1, greedy: bool,
                       generator: Optional[torch.Generator]) -> Rollout:
        """num_samples completions of each prompt dataset[indices]: one reply each (sample_rollout), or multi-turn
        episodes when the run has tools or an environment (rlhf_time.experience.agent_loop)."""
        if self.agent is None:
            return self.sample_rollout([dataset.input_ids[j] for j in indices], num_samples=num_samples, greedy=greedy,
                                       generator=generator)

        def draw(prompt_ids, *, num_samples: int, max_new_tokens: int) -> Rollout:
            with self._autocast():
                params = replace(self.sampling_params(greedy=greedy), max_new_tokens=max_new_tokens)
                return self.sampling_engine.sample(prompt_ids, params, num_samples=num_samples, generator=generator)

        return self.agent.sample(draw, dataset, indices, num_samples=num_samples,
                                 max_new_tokens=self.config.rollout.max_completion_length,
                                 pad_token_id=self.tokenizer.pad_token_id)

    def sampling_generator(self, micro_index: int) -> torch.Generator:
        """The sampling RNG of one micro-batch of this step (see rlhf_time.experience.sampler.sampling_generator)."""
        return sampling_generator(self.config.seed, self.global_step, self.dist.rank, micro_index, self.device)

    def score_rollout(self, dataset: PromptDataset, indices: list[int], rollout: Rollout,
                      group_size: int = 1) -> Experience:
        """A rollout of dataset[indices] (each prompt's group_size completions in consecutive rows), scored."""
        return score(self.rewards, self.tokenizer, dataset, indices, rollout, group_size)

    def collect_experience(self, micro_batches: list[dict[str, torch.Tensor]], dataset: PromptDataset,
                           group_size: int = 1) -> list[Experience]:
        """The step's experience, one per micro-batch of prompt indices: sampled (group_size per prompt), scored,
        its metrics recorded under the names every on-policy stage shares, a few samples logged."""
        experiences = collect(functools.partial(self.sample_prompts, dataset), self.rewards, self.tokenizer, dataset,
                              [batch["prompt_index"].tolist() for batch in micro_batches], group_size=group_size,
                              generators=[self.sampling_generator(i) for i in range(len(micro_batches))],
                              together=self.config.rollout.sample_together)
        for experience in experiences:
            experience.rollout = experience.rollout.to(self.device)
        self.record_metrics(experience_metrics(experiences, self.rewards.names))
        if self.dist.is_main and (self.global_step + 1) % self.config.logging_steps == 0:
            self._log_samples(dataset, experiences[0])
        return experiences

    # ------------------------------------------------------------------------------------------ log-probs
    def completion_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], *, with_entropy: bool = False):
        """log softmax(logits / temperature) of the completion tokens (N, C) float32, 0 elsewhere: the log-probs
        of the policy that sampled them, from final hidden states with only completion positions projected.
        with_entropy: also that distribution's entropy at each completion position (N, C), differentiable."""
        width, temperature = batch["loss_mask"].shape[1], self.config.temperature
        hidden, lm_head, labels = self._completion_states(model, batch)
        chunk = dict(chunk_size=self.config.loss_chunk_size, chunk_bytes=self.config.loss_chunk_bytes)
        if lm_head is None:  # logits (LoRA on lm_head, FSDP)
            states, weight, bias = hidden / temperature, None, None
            per_position = token_logps(states, labels, **chunk)
        else:  # (h W^T + b) / T = h (W / T)^T + b / T
            states, weight, bias = hidden, lm_head.weight, lm_head.bias
            if temperature != 1.0:
                weight, bias = weight / temperature, (bias / temperature if bias is not None else None)
            per_position = chunked_token_logps(hidden, weight, labels, lm_head_bias=bias, **chunk)  # (N, T-1)
        logps = per_position[:, -width:]  # completion positions: the last C of the T-1 predictions
        if not with_entropy:
            return logps
        entropy = token_entropy(states, labels, lm_head_weight=weight, lm_head_bias=bias, **chunk)
        return logps, entropy[:, -width:]

    def _completion_states(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(final hidden states, lm_head, labels) whose shifted positions predict the completion tokens -- or
        (logits, None, labels) when the head cannot be used outside forward (see final_hidden_states).

        When `group_size` G > 1 completions share each prompt (GRPO), its tokens go through the model once (with
        gradients), its key/value cache is repeated to the G rows, and only the completion tokens go through for
        each row: P + G*C tokens per prompt instead of G*(P + C), exactly the same log-probs.
        """
        group = int(batch.get("group_size", 1))
        core = getattr(model, "module", model)
        lm_head = core.get_output_embeddings()
        # Gradient checkpointing turns the cache off in training: those runs take the plain forward.
        flag = "is_activation_checkpointing" if hasattr(core, "is_activation_checkpointing") else "is_gradient_checkpointing"
        checkpointing = getattr(core, flag, False)
        if group == 1 or type(lm_head) is not nn.Linear or parallel.is_fsdp(core) or checkpointing:
            hidden, lm_head = self.final_hidden_states(model, batch)
            return hidden, lm_head, batch["labels"]
        width = batch["loss_mask"].shape[1]
        prompt_length = batch["input_ids"].shape[1] - width
        prompt = {key: batch[key][::group, :prompt_length] for key in ("input_ids", "attention_mask", "position_ids")}
        # The prompt pass runs outside a DDP wrapper: the gradients of both passes meet in each parameter's
        # accumulator before DDP's hook fires, once per backward.
        out = core(**prompt, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        out.cache.batch_repeat_interleave(group)
        last_prompt_state = out.hidden_states[-1][:, -1:].repeat_interleave(group, dim=0)  # (N, 1, H)
        completion = model(input_ids=batch["input_ids"][:, prompt_length:], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"][:, prompt_length:], cache=out.cache, use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
        hidden = torch.cat([last_prompt_state, completion.hidden_states[-1]], dim=1)  # (N, 1 + C, H)
        labels = batch["labels"][:, prompt_length - 1 :]  # (N, 1 + C): the first column predicts nothing
        return hidden, lm_head, labels

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sampled tokens' log-probs under the frozen initial policy (LoRA: the adapters disabled), (N, C)."""
        with self._autocast():
            if "reference" in self.aux:
                return self.completion_logps(self.aux["reference"], batch)
            was_training = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter():
                    return self.completion_logps(self.model, batch)
            finally:
                self.model.train(was_training)

    # ------------------------------------------------------------------------------------------ samples
    def _log_samples(self, dataset: PromptDataset, experience: Experience) -> None:
        """The first completion of a few prompts of this step with its rewards: appended to completions.jsonl in
        the run folder, and a TensorBoard text table when TensorBoard is on."""
        group, step = experience.group_size, self.global_step + 1
        records = [{"step": step, "prompt": dataset.prompts[experience.indices[row // group]],
                    "completion": experience.texts[row], "reward": float(experience.rewards[row]),
                    **{name: experience.per_function[f][row] for f, name in enumerate(self.rewards.names)},
                    **_trajectory(experience.rollout.episodes, row)}
                   for row in range(0, min(len(experience.texts), SAMPLES_LOGGED * group), group)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "completions.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if "tensorboard" in self.config.report_to and records:
            if getattr(self, "_text_writer", None) is None:
                from torch.utils.tensorboard import SummaryWriter

                self._text_writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            table = "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(
                f"| {r['prompt']} | {r['completion']} | {r['reward']:.3f} |" for r in records)
            self._text_writer.add_text("completions", table, records[0]["step"])
            self._text_writer.flush()

    # --------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset: PromptDataset) -> dict[str, torch.Tensor]:
        """Rewards of greedy completions of the eval prompts, summed (in total and per reward function)."""
        indices = batch["prompt_index"].tolist()
        rollout = self.sample_prompts(dataset, indices, num_samples=1, greedy=True, generator=None)
        experience = self.score_rollout(dataset, indices, rollout)
        rewards, per_function, device = experience.rewards, experience.per_function, self.device
        sums = {"reward_sum": rewards.sum().to(device), "prompts": torch.tensor(float(len(indices)), device=device),
                "length_sum": rollout.completion_lengths.sum().float().to(device)}
        for f, name in enumerate(self.rewards.names):
            values = [v for v in per_function[f] if v is not None]
            sums[f"{name}:sum"] = torch.tensor(float(sum(values)), device=device)
            sums[f"{name}:n"] = torch.tensor(float(len(values)), device=device)
        return sums

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        prompts = max(totals.get("prompts", 0.0), 1.0)
        metrics = {"eval_reward": totals.get("reward_sum", 0.0) / prompts,
                   "eval_completion_length": totals.get("length_sum", 0.0) / prompts}
        for name in self.rewards.names:
            if totals.get(f"{name}:n"):
                metrics[f"eval_reward/{name}"] = totals[f"{name}:sum"] / totals[f"{name}:n"]
        return metrics


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every layer (LoRA's lora_dropout included, and attention dropout): with it on, the training
    forward would score the sampled tokens with a different random network than the one that sampled them, so
    the log-probs of sampling and training would differ and PPO's first ratio would not be 1 (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _trajectory(episodes, row: int) -> dict:
    """A multi-turn sample's whole episode for completions.jsonl: every turn after the prompt, and its counts."""
    if episodes is None:
        return {}
    episode = episodes[row]
    return {"trajectory": episode.messages, "turns": episode.turns, "tool_calls": episode.tool_calls,
            "failed_tool_calls": episode.failed_tool_calls}


def _is_adapter_folder(folder: str) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()
