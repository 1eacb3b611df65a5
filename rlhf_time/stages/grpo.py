"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath; DeepSeek-R1), with DAPO and Dr. GRPO options.

One loop step: prepare experience (sample G completions per prompt with a KV cache, score them with the reward
functions / reward model, group-relative advantages, reference log-probs when kl_coef > 0) -> count the loss items
of the whole step -> num_iterations optimiser steps of the loop on that experience -> stage metrics.

Per completion token: loss_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps_high)) + kl_coef * k3_t, where
rho_t = pi(y_t) / pi_old(y_t) and pi_old is the policy that sampled the batch; aggregated by grpo_loss_type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch import nn

from rlhf_time.data.prompts import PromptDataset
from rlhf_time.loss import aggregate_loss, clipped_tokens, create_loss, group_advantages, k3_kl, loss_items
from rlhf_time.experience.sampler import Rollout
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.stages.on_policy import SAMPLES_LOGGED, PromptTrainer

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
    """GRPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]); reward functions as in rlhf_time.experience.rewards."""

    def __init__(self, config, reward_funcs=None) -> None:
        super().__init__(config, reward_funcs)
        self.policy_loss = create_loss("policy", clip_eps=config.rollout.epsilon, clip_eps_high=config.rollout.epsilon_high,
                                       reduction="none")
        self._step_tokens = 1.0  # completion tokens of the step being trained, all ranks (for per-token metrics)

    def needs_reference(self) -> bool:
        return self.config.grpo.kl_coef > 0

    # ------------------------------------------------------------------------------------- experience
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Sample, score, and turn each micro-batch of prompts into (sequences, old log-probs, advantages)."""
        config, group = self.config, self.config.grpo.num_generations
        dataset = self.prompt_dataset(micro_batches[0])
        sampled = []
        for i, batch in enumerate(micro_batches):
            indices = batch["prompt_index"].tolist()
            rollout = self.sample_rollout([dataset.input_ids[j] for j in indices], num_samples=group, greedy=False,
                                          generator=self.sampling_generator(i))
            sampled.append(ScoredRollout(indices, rollout, *self.score(dataset, indices, rollout, group)))

        all_rewards = torch.cat([s.rewards for s in sampled]).to(self.device)
        batch_std = _global_std(all_rewards) if config.grpo.scale_rewards == "batch" else None
        prepared = []
        for scored in sampled:
            advantages = group_advantages(scored.rewards.to(self.device), group, scale_rewards=config.grpo.scale_rewards,
                                          batch_std=batch_std)
            prepared.append(self._experience(scored.rollout.to(self.device), advantages))
        self._step_tokens = float(all_reduce_sum(sum(b["loss_mask"].sum().float() for b in prepared)))
        self._record_rollout_metrics(sampled, prepared)
        if self.dist.is_main and (self.global_step + 1) % config.logging_steps == 0:
            self._log_samples(dataset, sampled[0])
        return prepared

    def _experience(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors one micro-batch trains on (old log-probs: sampling's own, see compute_loss)."""
        batch = self.rollout_batch(rollout)
        if self.config.grpo.mask_truncated_completions:
            batch["loss_mask"] = batch["loss_mask"] & ~rollout.truncated[:, None]
        batch["advantages"] = advantages
        batch["group_size"] = torch.tensor(self.config.grpo.num_generations)  # rows i*G .. i*G+G-1 share their prompt
        if self.config.grpo.kl_coef > 0:
            batch["ref_logps"] = self.reference_logps(batch)
        return batch

    # ------------------------------------------------------------------------------------------ update
    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """num_iterations (mu) optimiser steps on one generated batch (the old log-probs stay those of sampling)."""
        for _ in range(self.config.grpo.num_iterations):
            metrics = self.optimizer_step(micro_batches)
        return metrics

    def optimizer_steps_per_update(self) -> int:
        return self.config.grpo.num_iterations

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_items(batch["loss_mask"], self.config.grpo.loss_type)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        config = self.config
        logps = self.completion_logps(model, batch)  # (N, C)
        mask = batch["loss_mask"]
        # mu = 1: the policy that sampled is the one being trained, rho = 1 exactly (no recomputation needed).
        old_logps = batch["old_logps"] if config.grpo.num_iterations > 1 else logps.detach()
        per_token = self.policy_loss(logps, old_logps, batch["advantages"], mask)  # (N, C)
        metrics: dict[str, torch.Tensor] = {}
        if config.grpo.kl_coef > 0:
            kl = k3_kl(logps, batch["ref_logps"])
            per_token = per_token + config.grpo.kl_coef * kl
            metrics["kl"] = (kl.detach() * mask).sum() / self._step_tokens
        loss = aggregate_loss(per_token, mask, config.grpo.loss_type, max_completion_length=config.rollout.max_completion_length,
                              num_items=num_items)
        ratio = torch.exp(logps.detach() - old_logps)
        low, high = clipped_tokens(ratio, batch["advantages"], mask, clip_eps=config.rollout.epsilon,
                                   clip_eps_high=config.rollout.epsilon_high)
        metrics["clip_ratio/low"], metrics["clip_ratio/high"] = low / self._step_tokens, high / self._step_tokens
        return loss, metrics

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        return total if name in _PER_TOKEN_METRICS else super().reduce_train_metric(name, total, num_items)

    # ---------------------------------------------------------------------------------------- metrics
    def _record_rollout_metrics(self, sampled: list[ScoredRollout], prepared: list[dict[str, torch.Tensor]]) -> None:
        """Reward, group, length and entropy statistics of the step, over all ranks."""
        group, device = self.config.grpo.num_generations, self.device
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
        """The first completion of a few prompts of this step, with its rewards (see log_samples)."""
        group, step = self.config.grpo.num_generations, self.global_step + 1
        self.log_samples([{"step": step, "prompt": dataset.prompts[scored.indices[row // group]],
                           "completion": scored.texts[row], "reward": float(scored.rewards[row]),
                           **{name: scored.per_function[f][row] for f, name in enumerate(self.rewards.names)}}
                          for row in range(0, min(len(scored.texts), SAMPLES_LOGGED * group), group)], "reward")


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
