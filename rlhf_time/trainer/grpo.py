"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath; DeepSeek-R1), with DAPO and Dr. GRPO options.

One loop step: prepare experience (sample G completions per prompt with a KV cache, score them with the reward
functions / reward model, group-relative advantages, reference log-probs when kl_coef > 0) -> count the loss items
of the whole step -> num_iterations optimiser steps of the loop on that experience -> stage metrics.

Per completion token: loss_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps_high)) + kl_coef * k3_t, where
rho_t = pi(y_t) / pi_old(y_t) and pi_old is the policy that sampled the batch; aggregated by grpo_loss_type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data.prompts import PromptDataset
from rlhf_time.loss import (aggregate_loss, chunk_rows, chunked_token_logps, clipped_tokens, create_loss, group_advantages, k3_kl,
                            loss_items, token_logps)
from rlhf_time.rewards import RewardModelReward, RewardScorer, load_reward_function
from rlhf_time.rollout import Rollout, sample
from rlhf_time.trainer.auxiliary import AuxiliaryModel
from rlhf_time.trainer.distributed import all_reduce_sum
from rlhf_time.trainer.on_policy import PromptTrainer
from rlhf_time.trainer import parallel

SAMPLES_LOGGED = 4  # prompts/completions written to completions.jsonl every logging_steps
# Train metrics that prepare_step already normalised by the step's completion tokens (not per loss item).
_PER_TOKEN_METRICS = ("clip_ratio/low", "clip_ratio/high", "kl")


@dataclass
class ScoredRollout:
    """One micro-batch's completions and their rewards (rows i*G .. i*G+G-1 are prompt indices[i]'s group)."""

    indices: list[int]  # prompt indices in the data set
    rollout: Rollout
    rewards: torch.Tensor  # (N,) weighted sum of the rewards
    per_function: list[list[Optional[float]]]  # each reward function's values (None: does not apply)
    texts: list[str]  # the completions as the reward functions saw them


class GRPOTrainer(PromptTrainer):
    """GRPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]); reward functions as in rlhf_time.rewards."""

    model_head = "causal_lm"

    def __init__(self, config, reward_funcs: Optional[Sequence] = None) -> None:
        if not config.is_set("metric_for_best_model"):  # there is no eval loss: greedy completions' mean reward
            config.metric_for_best_model = "eval_reward"
        for spec in reward_funcs if reward_funcs is not None else config.reward_funcs:
            load_reward_function(spec)  # a bad reward function fails before any model is loaded
        super().__init__(config)
        reward_model = self._reward_model_reward() if config.reward_model else None
        self.rewards = RewardScorer.from_config(config, reward_funcs, reward_model=reward_model)
        self.policy_loss = create_loss("policy", clip_eps=config.epsilon, clip_eps_high=config.epsilon_high,
                                       reduction="none")
        self._step_tokens = 1.0  # completion tokens of the step being trained, all ranks (for per-token metrics)

    # ----------------------------------------------------------------------------------- what it needs
    def auxiliary_models(self) -> list[AuxiliaryModel]:
        config, models = self.config, []
        if config.kl_coef > 0 and not config.use_lora:  # with LoRA the reference is the adapter-disabled policy
            models.append(AuxiliaryModel("reference"))
        if config.reward_model and not _is_adapter_folder(config.reward_model):
            models.append(AuxiliaryModel("reward", source=config.reward_model, head="reward", cast_to_amp_dtype=True))
        return models

    def _reward_model_reward(self) -> RewardModelReward:
        """The reward model as one more reward, scored with its own tokenizer and saved layout; a LoRA reward-model
        folder (base + adapter + score head) is loaded whole by rlhf_time.inference."""
        folder = self.config.reward_model
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

    # ------------------------------------------------------------------------------------- experience
    def stop_token_ids(self) -> list[int]:
        return self.inference.stop_token_ids()

    def sample_rollout(self, prompt_ids: list[list[int]], *, num_samples: int, greedy: bool,
                       generator: Optional[torch.Generator]) -> Rollout:
        """Completions of these prompts by the current policy (tests override this to inject completions)."""
        config = self.config
        with self._autocast():
            return sample(self.model, prompt_ids, num_samples=num_samples, max_new_tokens=config.max_completion_length,
                          pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=self.stop_token_ids(),
                          do_sample=not greedy, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k, generator=generator,
                          stop_early=not parallel.is_fsdp(self.model))  # FSDP ranks must run the same forwards

    def sampling_generator(self, micro_index: int) -> torch.Generator:
        """The sampling RNG of one micro-batch: a pure function of (seed, step, rank, micro-batch), so a resumed run
        samples exactly what the uninterrupted run sampled, and ranks sample independently."""
        seed = np.random.SeedSequence([self.config.seed, self.global_step, self.dist.rank, micro_index])
        return torch.Generator(device=self.device).manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))

    def score(self, dataset: PromptDataset, indices: list[int], rollout: Rollout, repeat: int):
        """(weighted rewards (N,), each function's values, completion texts) of a rollout of dataset[indices]."""
        completion_ids = rollout.completion_lists()
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [dataset.prompts[i] for i in indices for _ in range(repeat)]
        columns = {**dataset.reward_columns(indices, repeat), "completion_ids": completion_ids}
        totals, per_function = self.rewards(prompts, texts, columns)
        return torch.tensor(totals, dtype=torch.float32), per_function, texts

    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Sample, score, and turn each micro-batch of prompts into (sequences, old log-probs, advantages)."""
        config, group = self.config, self.config.num_generations
        dataset = self.prompt_dataset(micro_batches[0])
        sampled = []
        for i, batch in enumerate(micro_batches):
            indices = batch["prompt_index"].tolist()
            rollout = self.sample_rollout([dataset.input_ids[j] for j in indices], num_samples=group, greedy=False,
                                          generator=self.sampling_generator(i))
            sampled.append(ScoredRollout(indices, rollout, *self.score(dataset, indices, rollout, group)))

        all_rewards = torch.cat([s.rewards for s in sampled]).to(self.device)
        batch_std = _global_std(all_rewards) if config.scale_rewards == "batch" else None
        prepared = []
        for scored in sampled:
            advantages = group_advantages(scored.rewards.to(self.device), group, scale_rewards=config.scale_rewards,
                                          batch_std=batch_std)
            prepared.append(self._experience(scored.rollout.to(self.device), advantages))
        self._step_tokens = float(all_reduce_sum(sum(b["loss_mask"].sum().float() for b in prepared)))
        self._record_rollout_metrics(sampled, prepared)
        if self.dist.is_main and (self.global_step + 1) % config.logging_steps == 0:
            self._log_samples(dataset, sampled[0])
        return prepared

    def _experience(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors one micro-batch trains on; labels mark the sampled tokens (the log-probs are taken there)."""
        prompt_length = rollout.prompt_length
        labels = rollout.input_ids.masked_fill(rollout.attention_mask == 0, IGNORE_INDEX)
        labels[:, :prompt_length] = IGNORE_INDEX
        loss_mask = rollout.completion_mask
        if self.config.mask_truncated_completions:
            loss_mask = loss_mask & ~rollout.truncated[:, None]
        batch = {
            "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids, "labels": labels, "loss_mask": loss_mask,
            "old_logps": rollout.logps, "advantages": advantages,
            "truncated": rollout.truncated, "entropies": rollout.entropies,
            "group_size": torch.tensor(self.config.num_generations),  # rows i*G .. i*G+G-1 share their prompt
        }
        if self.config.kl_coef > 0:
            batch["ref_logps"] = self.reference_logps(batch)
        return batch

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-probs of the sampled tokens under the frozen initial policy (LoRA: the adapters disabled), (N, C)."""
        with self._autocast():
            if "reference" in self.aux:
                return self.completion_logps(self.aux["reference"], batch)
            with self.model.disable_adapter():
                was_training = self.model.training
                self.model.eval()
                try:
                    return self.completion_logps(self.model, batch)
                finally:
                    self.model.train(was_training)

    def completion_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log softmax(logits / temperature) of the sampled tokens (N, C) float32, 0 elsewhere: the log-probs of
        sampling, computed from final hidden states with only completion positions projected to the vocabulary."""
        width = batch["old_logps"].shape[1]
        temperature = self.config.temperature
        hidden, lm_head, labels = self._completion_states(model, batch)
        chunk = chunk_rows(len(self.tokenizer), self.config.loss_chunk_size, self.config.loss_chunk_bytes)
        if lm_head is not None:
            weight, bias = lm_head.weight, lm_head.bias
            if temperature != 1.0:  # (h W^T + b) / T = h (W / T)^T + b / T
                weight, bias = weight / temperature, (bias / temperature if bias is not None else None)
            per_position = chunked_token_logps(hidden, weight, labels, lm_head_bias=bias, chunk_size=chunk)  # (N, T-1)
        else:
            per_position = token_logps(hidden / temperature, labels, chunk_size=chunk)
        return per_position[:, -width:]  # completion positions: the last C of the T-1 predictions

    def _completion_states(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(final hidden states, lm_head, labels) whose shifted positions predict the completion tokens -- or
        (logits, None, labels) when the head cannot be used outside forward (see final_hidden_states).

        The G completions of a prompt share it: its tokens go through the model once (with gradients), its
        key/value cache is repeated to the G rows, and only the completion tokens go through for each row, so the
        forward costs P + G*C tokens per prompt instead of G*(P + C) (exactly the same log-probs).
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
        width = batch["old_logps"].shape[1]
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

    # ------------------------------------------------------------------------------------------ update
    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """num_iterations (mu) optimiser steps on one generated batch (the old log-probs stay those of sampling)."""
        for _ in range(self.config.num_iterations):
            metrics = self.optimizer_step(micro_batches)
        return metrics

    def optimizer_steps_per_update(self) -> int:
        return self.config.num_iterations

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_items(batch["loss_mask"], self.config.grpo_loss_type)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        config = self.config
        logps = self.completion_logps(model, batch)  # (N, C)
        mask = batch["loss_mask"]
        # mu = 1: the policy that sampled is the one being trained, rho = 1 exactly (no recomputation needed).
        old_logps = batch["old_logps"] if config.num_iterations > 1 else logps.detach()
        per_token = self.policy_loss(logps, old_logps, batch["advantages"], mask)  # (N, C)
        metrics: dict[str, torch.Tensor] = {}
        if config.kl_coef > 0:
            kl = k3_kl(logps, batch["ref_logps"])
            per_token = per_token + config.kl_coef * kl
            metrics["kl"] = (kl.detach() * mask).sum() / self._step_tokens
        loss = aggregate_loss(per_token, mask, config.grpo_loss_type, max_completion_length=config.max_completion_length,
                              num_items=num_items)
        ratio = torch.exp(logps.detach() - old_logps)
        low, high = clipped_tokens(ratio, batch["advantages"], mask, clip_eps=config.epsilon,
                                   clip_eps_high=config.epsilon_high)
        metrics["clip_ratio/low"], metrics["clip_ratio/high"] = low / self._step_tokens, high / self._step_tokens
        return loss, metrics

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        return total if name in _PER_TOKEN_METRICS else super().reduce_train_metric(name, total, num_items)

    # ---------------------------------------------------------------------------------------- metrics
    def _record_rollout_metrics(self, sampled: list[ScoredRollout], prepared: list[dict[str, torch.Tensor]]) -> None:
        """Reward, group, length and entropy statistics of the step, over all ranks."""
        group, device = self.config.num_generations, self.device
        rewards = torch.cat([s.rewards for s in sampled]).to(device)
        lengths = torch.cat([s.rollout.completion_lengths for s in sampled]).float().to(device)
        truncated = torch.cat([b["truncated"] for b in prepared]).float()
        grouped = rewards.view(-1, group)
        flat_groups = (grouped.amax(1) == grouped.amin(1)).float()
        sums = {"n": torch.tensor(float(rewards.numel()), device=device), "reward": rewards.sum(),
                "reward_sq": (rewards**2).sum(), "groups": torch.tensor(float(grouped.shape[0]), device=device),
                "flat_groups": flat_groups.sum(), "length": lengths.sum(), "truncated": truncated.sum(),
                "entropy": sum(b["entropies"].sum() for b in prepared),  # 0 past each completion's end
                "sampled_tokens": lengths.sum()}
        for f, name in enumerate(self.rewards.names):
            values = [v for s in sampled for v in s.per_function[f] if v is not None]
            sums[f"{name}:sum"] = torch.tensor(float(sum(values)), device=device)
            sums[f"{name}:n"] = torch.tensor(float(len(values)), device=device)
        totals = {k: float(all_reduce_sum(v.float())) for k, v in sums.items()}
        n = max(totals["n"], 1.0)
        mean = totals["reward"] / n
        variance = (totals["reward_sq"] - n * mean**2) / max(n - 1, 1.0)  # sample variance, as the advantages use
        metrics = {
            "train/reward": mean, "train/reward_std": math.sqrt(max(variance, 0.0)),
            "train/frac_reward_zero_std": totals["flat_groups"] / max(totals["groups"], 1.0),
            "train/completions/mean_length": totals["length"] / n,
            "train/completions/min_length": _all_reduce(lengths.min(), torch_dist.ReduceOp.MIN),
            "train/completions/max_length": _all_reduce(lengths.max(), torch_dist.ReduceOp.MAX),
            "train/completions/truncated_ratio": totals["truncated"] / n,
            "train/entropy": totals["entropy"] / max(totals["sampled_tokens"], 1.0),
        }
        for name in self.rewards.names:
            if totals[f"{name}:n"]:
                metrics[f"train/rewards/{name}"] = totals[f"{name}:sum"] / totals[f"{name}:n"]
        self.record_metrics(metrics)

    def _log_samples(self, dataset: PromptDataset, scored: ScoredRollout) -> None:
        """A few prompts, completions and rewards of this step: completions.jsonl in the run folder, TensorBoard text."""
        group, step = self.config.num_generations, self.global_step + 1
        records = [{"step": step, "prompt": dataset.prompts[scored.indices[row // group]], "completion": scored.texts[row],
                    "reward": float(scored.rewards[row]),
                    **{name: scored.per_function[f][row] for f, name in enumerate(self.rewards.names)}}
                   for row in range(0, min(len(scored.texts), SAMPLES_LOGGED * group), group)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "completions.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if "tensorboard" in self.config.report_to:
            if getattr(self, "_text_writer", None) is None:
                from torch.utils.tensorboard import SummaryWriter

                self._text_writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            table = "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(
                f"| {r['prompt']} | {r['completion']} | {r['reward']:.3f} |" for r in records)
            self._text_writer.add_text("completions", table, step)
            self._text_writer.flush()

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewards of greedy completions of the eval prompts, summed per function."""
        dataset = self.prompt_dataset(batch)
        indices = batch["prompt_index"].tolist()
        rollout = self.sample_rollout([dataset.input_ids[j] for j in indices], num_samples=1, greedy=True,
                                      generator=None)
        rewards, per_function, _ = self.score(dataset, indices, rollout, 1)
        device = self.device
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


def _is_adapter_folder(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "adapter_config.json").is_file()


def _global_std(values: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation of `values` gathered over all ranks (each rank passes its own)."""
    n = all_reduce_sum(torch.tensor(float(values.numel()), device=values.device))
    total = all_reduce_sum(values.sum())
    squares = all_reduce_sum((values**2).sum())
    mean = total / n
    return ((squares - n * mean**2).clamp(min=0) / (n - 1).clamp(min=1)).sqrt()


def _all_reduce(value: torch.Tensor, op) -> float:
    value = value.detach().float().clone()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(value, op=op)
    return float(value)
