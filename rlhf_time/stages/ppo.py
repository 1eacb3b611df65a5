"""PPO for RLHF (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019): a policy, its frozen initial copy as the
reference, a reward (reward model and/or reward functions) and a trained critic.

One loop step = one rollout:
  prepare experience (prepare_step): sample one completion per prompt with a KV cache; the policy's log-probs of
    the sampled tokens recomputed by the training forward (old_logps), the reference's, the critic's values;
    per-token rewards r_t = -kl_coef (logp_t - ref_logp_t) + score on the last token; GAE advantages and returns
    (advantages whitened over the step's completion tokens, all ranks)
  -> update: ppo.epochs passes x num_mini_batches groups of micro-batches, each one policy step of the loop
    (clipped surrogate, create_loss("policy")) and one critic step (clipped value loss x vf_coef, own AdamW)
  -> stage metrics.
Prompt data, sampling, scoring, log-probs and evaluation (the mean reward of greedy completions of the eval
prompts) are GRPO's: rlhf_time.stages.on_policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import (AdaptiveKLController, clipped_tokens, create_loss, explained_variance, gae, k3_kl,
                            masked_moments, masked_whiten, token_rewards)
from rlhf_time.models.checks import require_reward_model
from rlhf_time.experience.experience import Experience
from rlhf_time.runtime import checkpoint as ckpt
from rlhf_time.runtime import parallel
from rlhf_time.experience.critic import CriticOptimizer, build_critic
from rlhf_time.runtime.distributed import all_reduce_sum, barrier
from rlhf_time.runtime.guards import NonFiniteGuard, require_finite_weights
from rlhf_time.runtime.update import ModelUpdate
from rlhf_time.stages.on_policy import PromptTrainer, disable_dropout


class PPOTrainer(PromptTrainer):
    """PPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]); reward functions as GRPO's
    (rlhf_time.experience.rewards), optional when reward_model is set."""

    def __init__(self, config, reward_funcs: Optional[Sequence] = None) -> None:
        if not (reward_funcs or config.rollout.reward_funcs or config.rollout.reward_model):
            raise RlhfTimeError("stage ppo needs a reward: reward_model (a folder trained with stage rm) and/or reward_funcs")
        if config.rollout.environment is not None or config.tools:  # its critic's GAE runs over one reply
            raise RlhfTimeError("stage ppo samples one reply per prompt: multi-turn episodes (tools, "
                                "rollout.environment) run with stage grpo (any advantage_estimator) or online_dpo")
        if config.ppo.value_model not in (None, "policy"):  # the critic starts from a trained value head, not a random one
            require_reward_model(config.ppo.value_model, "ppo.value_model", needed_by="ppo.value_model (or ppo.value_model: policy)")
        super().__init__(config, reward_funcs)
        self.kl_controller = AdaptiveKLController(config.ppo.kl_coef, config.ppo.kl_target, config.ppo.kl_horizon)
        self.critic = build_critic(config, self.tokenizer, self.family, self.dist)
        disable_dropout(self.critic)  # values at rollout time and in the update come from the same network
        self.train_critic = parallel.wrap_model(self.critic, config, self.dist) if self.dist.enabled else self.critic
        steps = (self.total_steps() if self.train_dataset is not None else 1) * self.optimizer_steps_per_update()
        self.critic_optimizer = CriticOptimizer(self.critic, config, steps)
        self.critic_guard = NonFiniteGuard(config.nan_policy, config.nan_max_consecutive_skips, subject="critic")
        self.critic_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.critic_update = ModelUpdate(self.critic, self.train_critic, self.critic_optimizer.optimizer,
                                         self.critic_optimizer.scheduler, self.critic_guard,
                                         max_grad_norm=config.max_grad_norm, world_size=self.dist.world_size,
                                         device=self.device, scaler=self.critic_scaler, autocast=self._autocast)
        self.value_loss = create_loss("value", clip_eps=config.ppo.value_clip, reduction="sum")
        self.policy_loss = create_loss("policy", clip_eps=config.rollout.epsilon, clip_eps_high=config.rollout.epsilon_high,
                                       reduction="none")
        self.update_history: list[dict[str, float]] = []  # each optimiser step of the last update (diagnostics)

    # ------------------------------------------------------------------------------------- experience
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """Sample and score one completion per prompt (the shared experience path), then turn each micro-batch into
        PPO's experience: old/reference log-probs, values, per-token rewards, GAE advantages and returns."""
        config = self.config
        experiences = self.collect_experience(micro_batches, dataset)
        prepared = [self._forward_experience(e) for e in experiences]
        scores = [self._adjusted_scores(e.rewards.to(self.device), e.rollout.truncated) for e in experiences]
        scaled = scores
        if config.ppo.whiten_rewards:  # unit spread, mean kept (Ziegler et al.): the sign of a score keeps its meaning
            flat = torch.cat(scores)
            moments = all_reduce_sum(masked_moments(flat, torch.ones_like(flat, dtype=torch.bool)))
            scaled = [masked_whiten(s, torch.ones_like(s, dtype=torch.bool), shift_mean=False, moments=moments)
                      for s in scores]
        kl_coef = self.kl_controller.value
        for batch, score, reward_score in zip(prepared, scores, scaled):
            mask = batch["loss_mask"]
            rewards, non_score = token_rewards(batch["old_logps"], batch["ref_logps"], reward_score, mask,
                                               kl_coef=kl_coef)
            advantages, returns = gae(rewards, batch["values"], mask, gamma=config.ppo.gamma, lam=config.ppo.lam)
            # scores: after missing_eos_penalty and reward_clip, before whitening (train/rlhf_reward)
            batch.update(scores=score, non_score_rewards=non_score, advantages=advantages, returns=returns)
        if config.ppo.whiten_advantages:
            moments = all_reduce_sum(sum(masked_moments(b["advantages"], b["loss_mask"]) for b in prepared))
            for batch in prepared:
                batch["advantages"] = masked_whiten(batch["advantages"], batch["loss_mask"], moments=moments)
        self._record_experience_metrics(prepared, kl_coef)
        return prepared

    def _adjusted_scores(self, scores: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """The sequence score after missing_eos_penalty (completions without a stop token) and reward_clip."""
        config = self.config
        if config.ppo.missing_eos_penalty is not None:
            scores = scores - config.ppo.missing_eos_penalty * truncated.float()
        if config.ppo.reward_clip is not None:
            scores = scores.clamp(-config.ppo.reward_clip, config.ppo.reward_clip)
        return scores

    @torch.no_grad()
    def _forward_experience(self, experience: Experience) -> dict[str, torch.Tensor]:
        """The tensors a micro-batch trains on. old_logps are recomputed by the forward the loss uses, so the first
        mini-batch of the first epoch has ratio exactly 1; sampling's own log-probs are kept to report the gap."""
        batch = experience.batch()
        batch["sampled_logps"] = batch["old_logps"]
        with self._autocast():
            batch["old_logps"] = self.completion_logps(self.model, batch) * batch["loss_mask"]
            batch["values"] = self.completion_values(self.critic, batch) * batch["loss_mask"]
        batch["ref_logps"] = self.reference_logps(batch) * batch["loss_mask"]
        return batch

    def completion_values(self, critic: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """V(s_t) for each completion token t (N, C): the critic's value at the position that predicts token t."""
        width = batch["loss_mask"].shape[1]
        prompt_length = batch["input_ids"].shape[1] - width
        values = critic(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (N, P + C)
        return values[:, prompt_length - 1 : prompt_length - 1 + width]

    # ------------------------------------------------------------------------------------------ update
    def mini_batches(self, count: int, epoch: int) -> list[list[int]]:
        """The micro-batch indices of each mini-batch in one PPO epoch: a permutation drawn from (seed, step,
        epoch), the same on every rank and in a resumed run, split into num_mini_batches groups."""
        seed = np.random.SeedSequence([self.config.seed, self.global_step, epoch, 7])
        order = np.random.default_rng(seed).permutation(count).tolist()
        return [group.tolist() for group in np.array_split(order, self.config.ppo.num_mini_batches) if len(group)]

    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """ppo_epochs x num_mini_batches policy steps (the loop's optimizer_step) and critic steps on one rollout."""
        self.update_history = []
        for epoch in range(self.config.ppo.epochs):
            for group in self.mini_batches(len(micro_batches), epoch):
                batches = [micro_batches[i] for i in group]
                metrics = self.optimizer_step(batches)
                metrics.update(self.critic_step(batches))
                self.update_history.append(metrics)
        # Logged: the last step's loss/lr/throughput; diagnostics averaged over the update's steps.
        logged = dict(self.update_history[-1])
        for name in logged:
            if name.startswith(("train/policy/", "train/value/")):
                logged[name] = float(np.mean([m[name] for m in self.update_history]))
        return logged

    def optimizer_steps_per_update(self) -> int:
        return self.config.ppo.epochs * min(self.config.ppo.num_mini_batches, self.config.gradient_accumulation_steps)

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["loss_mask"].sum())

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        """Clipped surrogate (minus entropy_coef x the policy's token entropy) summed over completion tokens / the
        step's tokens (all micro-batches, all ranks)."""
        mask, entropy_coef = batch["loss_mask"], self.config.ppo.entropy_coef
        if entropy_coef > 0:
            logps, entropy = self.completion_logps(model, batch, with_entropy=True)  # (N, C) each
        else:
            logps, entropy = self.completion_logps(model, batch), None
        per_token = self.policy_loss(logps, batch["old_logps"], batch["advantages"], mask)  # (N, C), 0 where masked
        if entropy is not None:  # the entropy bonus: a higher entropy lowers the loss
            per_token = per_token - entropy_coef * entropy * mask
        log_ratio = (logps.detach() - batch["old_logps"]) * mask
        ratio = torch.exp(log_ratio)
        low, high = clipped_tokens(ratio, batch["advantages"], mask, clip_eps=self.config.rollout.epsilon,
                                   clip_eps_high=self.config.rollout.epsilon_high)
        metrics = {
            "policy/clipfrac": low + high,
            "policy/approx_kl": (0.5 * log_ratio**2).sum(),  # E[(log rho)^2] / 2 (Schulman's k2) per token
            "policy/ratio_deviation": ((ratio - 1).abs() * mask).sum(),  # 0 exactly when every ratio is 1
        }
        if entropy is not None:
            metrics["policy/entropy"] = (entropy.detach() * mask).sum()
        return per_token.sum() / max(num_items, 1), metrics

    def critic_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One step of the critic's optimiser on these micro-batches through the loop's machinery (ModelUpdate),
        normalised like the policy's step: vf_coef x the clipped value loss summed over completion tokens / the
        step's tokens (all micro-batches, all ranks)."""
        result = self.critic_update.step(micro_batches, self.value_loss_of, self.count_items,
                                         global_step=self.global_step + 1, run_dir=self.run_dir)
        metrics = {"train/value/loss": result.loss / self.config.ppo.vf_coef,
                   "train/value/clipfrac": result.sums["clipped"] / max(result.num_items, 1),
                   "train/value/grad_norm": result.grad_norm}
        if not result.applied:
            metrics["train/value/update_skipped"] = 1.0
        return metrics

    def value_loss_of(self, critic: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        """(vf_coef x clipped value loss / num_items, {"clipped": values clipped}) of one micro-batch."""
        config, mask = self.config, batch["loss_mask"]
        values = self.completion_values(critic, batch)
        loss = config.ppo.vf_coef * self.value_loss(values, batch["values"], batch["returns"], mask) / max(num_items, 1)
        clipped = ((values.detach() - batch["values"]).abs() > config.ppo.value_clip) & mask.bool()
        return loss, {"clipped": clipped.sum().float()}

    # ---------------------------------------------------------------------------------------- metrics
    def _record_experience_metrics(self, prepared: list[dict[str, torch.Tensor]], kl_coef: float) -> None:
        """PPO's own statistics over all ranks (the shared reward/length/entropy metrics are collect_experience's);
        then the adaptive KL controller sees this step's KL."""
        device = self.device
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for b in prepared:
            mask = b["loss_mask"]
            k1 = ((b["old_logps"] - b["ref_logps"]) * mask).sum(-1)  # per-sequence KL estimates
            k3 = (k3_kl(b["old_logps"], b["ref_logps"]) * mask).sum(-1)
            sums += torch.stack([torch.tensor(float(mask.shape[0]), device=device), b["scores"].sum(),
                                 b["non_score_rewards"].sum(), k1.sum(), k3.sum()]).double()
        n, score, non_score, k1, k3 = all_reduce_sum(sums).tolist()
        mismatch = max(float(((b["sampled_logps"] - b["old_logps"]).abs() * b["loss_mask"]).max()) for b in prepared)
        values = torch.cat([b["values"].flatten() for b in prepared])
        returns = torch.cat([b["returns"].flatten() for b in prepared])
        mask = torch.cat([b["loss_mask"].flatten() for b in prepared])
        n = max(n, 1.0)
        metrics = {
            "train/non_score_reward": non_score / n,
            "train/rlhf_reward": (score + non_score) / n,  # the objective: adjusted score + the KL part
            "train/kl": k1 / n, "train/kl_k3": k3 / n, "train/kl_coef": kl_coef,
            "train/value/explained_variance": explained_variance(values, returns, mask, reduce=all_reduce_sum),
            "train/logps_sampling_gap": mismatch,  # max |sampling log-prob - training forward's| (this rank)
        }
        self.record_metrics(metrics)
        self.kl_controller.update(k1 / n, int(n))

    # ------------------------------------------------------------------------------------ checkpoints
    def train(self) -> dict[str, Any]:
        """The loop's train(), then the trained critic saved next to final/ as `critic/` (see save_critic)."""
        with self.holding_run_folder():  # critic/ is written under the same lock as the rest of the run
            results = super().train()
            results["critic_dir"] = str(self.save_critic(self.run_dir / "critic"))
        return results

    def save_critic(self, folder: Path) -> Path:
        """The critic as a model folder: a 1-label sequence-classification model (or its LoRA adapter and head) with
        the tokenizer, so `value_model: FOLDER` starts a later PPO run from it. Under FSDP the shards are gathered
        (every rank calls this)."""
        require_finite_weights(self.critic, folder, self.global_step, self.run_dir)
        state = {name.removeprefix("model."): tensor for name, tensor in parallel.full_weights(self.critic).items()}
        if self.dist.is_main:
            ckpt.save_model(folder, model=parallel.GatheredModel(self.critic.model, state), tokenizer=self.tokenizer,
                            config_yaml=yaml.safe_dump(_without_value_model(self.config.to_dict()), sort_keys=False,
                                                       allow_unicode=True))
        barrier()
        return folder

    def stage_state(self) -> dict[str, Any]:
        """The critic's full weights and optimiser/schedule, and the KL coefficient (adaptive controller); under
        FSDP the shards are gathered (every rank calls this). A non-finite critic is never checkpointed."""
        target = self.run_dir / f"checkpoint-{self.global_step}" / ckpt.STAGE_STATE_FILE
        require_finite_weights(self.critic, target, self.global_step, self.run_dir)
        state = {"critic": parallel.full_weights(self.critic), "critic_optimizer": self.critic_optimizer.state_dict(),
                 "kl_controller": self.kl_controller.state_dict(), "critic_guard": self.critic_guard.state_dict()}
        if self.critic_scaler is not None:
            state["critic_scaler"] = self.critic_scaler.state_dict()
        return state

    def load_stage_state(self, state: dict[str, Any]) -> None:
        parallel.load_full_state(self.critic, state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.critic_guard.load_state_dict(state.get("critic_guard", {}))  # absent in older checkpoints: none
        if self.critic_scaler is not None and "critic_scaler" in state:
            self.critic_scaler.load_state_dict(state["critic_scaler"])


__all__ = ["PPOTrainer"]


def _without_value_model(values: dict) -> dict:
    """The run's config as the critic folder records it: it is itself the value model of a later run."""
    return {**values, "ppo": {**values["ppo"], "value_model": None}}
