"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath; DeepSeek-R1), with DAPO and Dr. GRPO options.

One loop step: prepare experience (sample G completions per prompt with a KV cache, score them with the reward
functions / reward model, group-relative advantages, reference log-probs when kl_coef > 0) -> count the loss items
of the whole step -> num_iterations optimiser steps of the loop on that experience -> stage metrics.

Per completion token: loss_t = max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps_high)) + kl_coef * k3_t, where
rho_t = pi(y_t) / pi_old(y_t) and pi_old is the policy that sampled the batch; aggregated by grpo_loss_type.
Options: A from the group (grpo) or leave-one-out (rloo); rho per token or per sequence (GSPO); each token's loss
times min(pi_train / pi_sampler, tis_cap) (truncated importance sampling).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_time.experience.experience import Experience, global_mean_std
from rlhf_time.loss import (aggregate_loss, clipped_tokens, create_loss, discounted_returns, group_advantages, k3_kl,
                            loss_items, masked_moments, rloo_advantages, sequence_mean, token_rewards,
                            truncated_importance_weights, whiten_over_step)
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.stages.on_policy import PromptTrainer

# Train metrics that prepare_step already normalised by the step's completion tokens (not per loss item).
_PER_TOKEN_METRICS = ("clip_ratio/low", "clip_ratio/high", "kl", "sampler_kl", "tis_weight")
ADVANTAGE_ESTIMATORS = {"grpo": group_advantages, "rloo": rloo_advantages}
REINFORCE_PP = ("reinforce_pp", "reinforce_pp_baseline")  # token-level advantages, KL in the reward


class GRPOTrainer(PromptTrainer):
    """GRPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]); reward functions as in rlhf_time.experience.rewards."""

    def __init__(self, config, reward_funcs=None, *, tools=None, environment=None) -> None:
        super().__init__(config, reward_funcs, tools=tools, environment=environment)
        self.policy_loss = create_loss("policy", clip_eps=config.rollout.epsilon, clip_eps_high=config.rollout.epsilon_high,
                                       reduction="none")
        self._step_tokens = 1.0  # completion tokens of the step being trained, all ranks (for per-token metrics)

    def needs_reference(self) -> bool:
        return self.config.grpo.kl_coef > 0

    # ------------------------------------------------------------------------------------- experience
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """Sample and score G completions per prompt (the shared experience path), then turn each micro-batch into
        (sequences, old log-probs, group-relative advantages, reference log-probs when kl_coef > 0)."""
        config, group = self.config, self.config.grpo.num_generations
        experiences = self.collect_experience(micro_batches, dataset, group)
        prepared = [self._training_batch(experience) for experience in experiences]
        if config.grpo.advantage_estimator in REINFORCE_PP:
            self._reinforce_pp_advantages(experiences, prepared)
        else:
            all_rewards = torch.cat([e.rewards for e in experiences]).to(self.device)
            batch_std = global_mean_std(all_rewards)[1] if config.grpo.scale_rewards == "batch" else None
            estimator = ADVANTAGE_ESTIMATORS[config.grpo.advantage_estimator]
            for experience, batch in zip(experiences, prepared):
                batch["advantages"] = estimator(experience.rewards.to(self.device), group,
                                                scale_rewards=config.grpo.scale_rewards, batch_std=batch_std)
        self._step_tokens = float(all_reduce_sum(sum(b["loss_mask"].sum().float() for b in prepared)))
        return prepared

    def _reinforce_pp_advantages(self, experiences: list[Experience], prepared: list[dict[str, torch.Tensor]]) -> None:
        """REINFORCE++ (Hu 2025; OpenRLHF): each token's reward is -kl_coef * (log pi_old - log pi_ref), the last
        token's also the completion's reward (minus its group's mean for the baseline variant); the advantages are
        the returns, whitened with the mean and variance of every token of the step (all micro-batches, ranks)."""
        options, returns = self.config.grpo, []
        for experience, batch in zip(experiences, prepared):
            scores = experience.rewards.to(self.device).float()
            if options.advantage_estimator == "reinforce_pp_baseline":
                grouped = scores.view(-1, options.num_generations)
                scores = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
            reference = batch.get("ref_logps", batch["old_logps"])  # kl_coef 0: no reference, no KL part
            rewards, _ = token_rewards(batch["old_logps"], reference, scores, batch["loss_mask"], kl_coef=options.kl_coef)
            returns.append(discounted_returns(rewards, batch["loss_mask"]))
        moments = all_reduce_sum(sum(masked_moments(r, b["loss_mask"]) for r, b in zip(returns, prepared)))
        for batch, step_returns in zip(prepared, returns):
            batch["advantages"] = whiten_over_step(step_returns, batch["loss_mask"], moments)

    def _training_batch(self, experience: Experience) -> dict[str, torch.Tensor]:
        """The tensors one micro-batch trains on (old log-probs: sampling's own, see compute_loss); the advantages
        are added by prepare_step."""
        batch = experience.batch()
        if self.config.grpo.mask_truncated_completions:
            batch["loss_mask"] = batch["loss_mask"] & ~experience.rollout.truncated[:, None]
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
        ratio_logps, ratio_old = logps, old_logps
        if config.grpo.importance_sampling_level == "sequence":  # GSPO: one ratio per completion, on each token
            ratio_logps, ratio_old = sequence_mean(logps, mask), sequence_mean(old_logps, mask)
        per_token = self.policy_loss(ratio_logps, ratio_old, batch["advantages"], mask)  # (N, C)
        # The sampler's log-probs against this forward's, logged always: what an engine that samples differently
        # from the training forward (bf16, another kernel) shifts; TIS corrects the loss by their ratio.
        sampler_gap = torch.where(mask.bool(), batch["old_logps"].float() - logps.detach().float(), 0.0)
        metrics: dict[str, torch.Tensor] = {"sampler_kl": sampler_gap.sum() / self._step_tokens}
        if config.grpo.tis_cap is not None:
            weights = torch.where(mask.bool(), truncated_importance_weights(logps, batch["old_logps"],
                                                                            config.grpo.tis_cap), 0.0)
            per_token = per_token * weights
            metrics["tis_weight"] = (weights * mask).sum() / self._step_tokens
        if config.grpo.kl_coef > 0:
            kl = k3_kl(logps, batch["ref_logps"])
            if config.grpo.advantage_estimator not in REINFORCE_PP:  # REINFORCE++ has the KL in its rewards instead
                per_token = per_token + config.grpo.kl_coef * kl
            metrics["kl"] = (kl.detach() * mask).sum() / self._step_tokens
        loss = aggregate_loss(per_token, mask, config.grpo.loss_type, max_completion_length=config.rollout.max_completion_length,
                              num_items=num_items)
        ratio = torch.exp(ratio_logps.detach() - ratio_old)
        low, high = clipped_tokens(ratio, batch["advantages"], mask, clip_eps=config.rollout.epsilon,
                                   clip_eps_high=config.rollout.epsilon_high)
        metrics["clip_ratio/low"], metrics["clip_ratio/high"] = low / self._step_tokens, high / self._step_tokens
        return loss, metrics

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        return total if name in _PER_TOKEN_METRICS else super().reduce_train_metric(name, total, num_items)
