"""PPO for RLHF (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019): a policy, its frozen initial copy as the
reference, a reward (reward model and/or reward functions) and a trained critic.

One loop step = one rollout:
  prepare experience (prepare_step): sample one completion per prompt with a KV cache; the policy's log-probs of
    the sampled tokens recomputed by the training forward (old_logps), the reference's, the critic's values;
    per-token rewards r_t = -kl_coef (logp_t - ref_logp_t) + score on the last token; GAE advantages and returns
    (advantages whitened over the step's completion tokens, all ranks)
  -> update: ppo_epochs passes x num_mini_batches groups of micro-batches, each one policy step of the loop
    (clipped surrogate, create_loss("policy")) and one critic step (clipped value loss x vf_coef, own AdamW)
  -> stage metrics.
Prompt data (rlhf_time.data.prompts), sampling (rlhf_time.rollout) and reward functions (rlhf_time.rewards) are
the pieces GRPO uses; evaluation is the mean reward of greedy completions of the eval prompts.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data.prompts import PromptDataset
from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import (AdaptiveKLController, chunk_rows, chunked_token_logps, clipped_tokens, create_loss,
                            explained_variance, gae, k3_kl, masked_moments, masked_whiten, token_logps, token_rewards)
from rlhf_time.rewards import RewardModelReward, RewardScorer, load_reward_function
from rlhf_time.rollout import Rollout, sample
from rlhf_time.trainer import parallel
from rlhf_time.trainer.auxiliary import AuxiliaryModel
from rlhf_time.trainer.critic import CriticOptimizer, build_critic
from rlhf_time.trainer.distributed import all_reduce_sum
from rlhf_time.trainer.on_policy import PromptTrainer

SAMPLES_LOGGED = 4  # prompts/completions appended to completions.jsonl every logging_steps
DEFAULT_KL_COEF = 0.05  # PPO's reward is KL-penalised by default (the shared kl_coef field defaults to GRPO's 0)


class PPOTrainer(PromptTrainer):
    """PPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]); reward functions as GRPO's
    (rlhf_time.rewards), optional when reward_model is set."""

    model_head = "causal_lm"

    def __init__(self, config, reward_funcs: Optional[Sequence] = None) -> None:
        if not config.is_set("kl_coef"):
            config.kl_coef = DEFAULT_KL_COEF
        if not config.is_set("metric_for_best_model"):  # there is no eval loss: greedy completions' mean reward
            config.metric_for_best_model = "eval_reward"
        if config.distributed == "fsdp":
            raise RlhfTimeError("stage ppo runs under DDP (distributed: ddp); FSDP sharding of the critic is not supported yet")
        for spec in reward_funcs if reward_funcs is not None else config.reward_funcs:
            load_reward_function(spec)  # a bad reward function fails before any model is loaded
        if not (reward_funcs or config.reward_funcs or config.reward_model):
            raise RlhfTimeError("stage ppo needs a reward: reward_model (a folder trained with stage rm) and/or reward_funcs")
        super().__init__(config)
        reward_model = RewardModelReward.from_folder(config.reward_model, device=self.device) if config.reward_model else None
        self.rewards = RewardScorer.from_config(config, reward_funcs, reward_model=reward_model)
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.critic = build_critic(config, self.tokenizer, self.family, self.device)
        self.train_critic = parallel.wrap_model(self.critic, config, self.dist) if self.dist.enabled else self.critic
        steps = (self.total_steps() if self.train_dataset is not None else 1) * self.optimizer_steps_per_update()
        self.critic_optimizer = CriticOptimizer(self.critic, config, steps)
        self.value_loss = create_loss("value", clip_eps=config.value_clip, reduction="sum")
        self.policy_loss = create_loss("policy", clip_eps=config.epsilon, clip_eps_high=config.epsilon_high,
                                       reduction="none")
        self.update_history: list[dict[str, float]] = []  # each optimiser step of the last update (diagnostics)

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        """The reference (the KL penalty and its metrics): a frozen copy of the initial policy; none under LoRA,
        where the reference is the policy with its adapters disabled."""
        return [] if self.config.use_lora else [AuxiliaryModel("reference")]

    # -------------------------------------------------------------------------------- sampling, scoring
    def sample_rollout(self, prompt_ids: list[list[int]], *, greedy: bool,
                       generator: Optional[torch.Generator]) -> Rollout:
        """One completion of each prompt by the current policy, batched with a KV cache (rlhf_time.rollout)."""
        config = self.config
        with self._autocast():
            return sample(self.model, prompt_ids, max_new_tokens=config.max_completion_length,
                          pad_token_id=self.tokenizer.pad_token_id, stop_token_ids=self.inference.stop_token_ids(),
                          do_sample=not greedy, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k, generator=generator)

    def sampling_generator(self, micro_index: int) -> torch.Generator:
        """The sampling RNG of one micro-batch, a pure function of (seed, step, rank, micro-batch): a resumed run
        samples what the uninterrupted run sampled, and ranks sample independently."""
        seed = np.random.SeedSequence([self.config.seed, self.global_step, self.dist.rank, micro_index])
        return torch.Generator(device=self.device).manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))

    def score(self, dataset: PromptDataset, indices: list[int], rollout: Rollout):
        """(weighted rewards (N,), each function's values, completion texts) of one completion per prompt."""
        completion_ids = rollout.completion_lists()
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        columns = {**dataset.reward_columns(indices), "completion_ids": completion_ids}
        totals, per_function = self.rewards([dataset.prompts[i] for i in indices], texts, columns)
        return torch.tensor(totals, dtype=torch.float32), per_function, texts

    def completion_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log softmax(logits / temperature) of the completion tokens (N, C) float32, 0 elsewhere: the policy that
        sampled them. Only completion positions are projected to the vocabulary."""
        width, temperature = batch["loss_mask"].shape[1], self.config.temperature
        chunk = chunk_rows(len(self.tokenizer), self.config.loss_chunk_size, self.config.loss_chunk_bytes)
        hidden, lm_head = self.final_hidden_states(model, batch)
        if lm_head is None:  # logits (LoRA on lm_head, FSDP)
            per_position = token_logps(hidden / temperature, batch["labels"], chunk_size=chunk)
        else:  # (h W^T + b) / T = h (W / T)^T + b / T
            bias = lm_head.bias / temperature if lm_head.bias is not None else None
            per_position = chunked_token_logps(hidden, lm_head.weight / temperature, batch["labels"], lm_head_bias=bias,
                                               chunk_size=chunk)  # (N, T-1)
        return per_position[:, -width:]  # the last C of the T-1 predictions are the completion's

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sampled tokens' log-probs under the frozen initial policy (LoRA: the adapters disabled), (N, C)."""
        if "reference" in self.aux:
            return self.completion_logps(self.aux["reference"], batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.completion_logps(self.model, batch)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------------------------- experience
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Sample one completion per prompt, score it, and turn each micro-batch into PPO's experience."""
        config = self.config
        dataset = self.prompt_dataset(micro_batches[0])
        prepared, scores, sampled = [], [], []
        for i, batch in enumerate(micro_batches):
            indices = batch["prompt_index"].tolist()
            rollout = self.sample_rollout([dataset.input_ids[j] for j in indices], greedy=False,
                                          generator=self.sampling_generator(i)).to(self.device)
            rewards, _, texts = self.score(dataset, indices, rollout)
            sampled.append((indices, rewards, texts))
            scores.append(self._adjusted_scores(rewards.to(self.device), rollout.truncated))
            prepared.append(self._forward_experience(rollout))
        if config.whiten_rewards:  # scale only (Ziegler et al.): the sign of a score keeps its meaning
            flat = torch.cat(scores)
            moments = all_reduce_sum(masked_moments(flat, torch.ones_like(flat, dtype=torch.bool)))
            scores = [masked_whiten(s, torch.ones_like(s, dtype=torch.bool), shift_mean=False, moments=moments)
                      for s in scores]
        kl_coef = self.kl_controller.value
        for batch, score in zip(prepared, scores):
            mask = batch["loss_mask"]
            rewards, non_score = token_rewards(batch["old_logps"], batch["ref_logps"], score, mask, kl_coef=kl_coef)
            advantages, returns = gae(rewards, batch["values"], mask, gamma=config.gamma, lam=config.lam)
            batch.update(scores=score, non_score_rewards=non_score, advantages=advantages, returns=returns)
        if config.whiten_advantages:
            moments = all_reduce_sum(sum(masked_moments(b["advantages"], b["loss_mask"]) for b in prepared))
            for batch in prepared:
                batch["advantages"] = masked_whiten(batch["advantages"], batch["loss_mask"], moments=moments)
        self._record_experience_metrics(prepared, kl_coef)
        if self.dist.is_main and (self.global_step + 1) % config.logging_steps == 0:
            self._log_completions(dataset, *sampled[0])
        return prepared

    def _adjusted_scores(self, scores: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """The sequence score after missing_eos_penalty (completions without a stop token) and reward_clip."""
        config = self.config
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * truncated.float()
        if config.reward_clip is not None:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)
        return scores

    @torch.no_grad()
    def _forward_experience(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The tensors a micro-batch trains on. old_logps are recomputed by the forward the loss uses, so the first
        mini-batch of the first epoch has ratio exactly 1; sampling's own log-probs are kept to report the gap."""
        prompt_length = rollout.prompt_length
        labels = rollout.input_ids.masked_fill(rollout.attention_mask == 0, IGNORE_INDEX)
        labels[:, :prompt_length] = IGNORE_INDEX
        batch = {
            "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids, "labels": labels, "loss_mask": rollout.completion_mask,
            "old_logps": rollout.logps, "sampled_logps": rollout.logps, "truncated": rollout.truncated,
            "entropies": rollout.entropies,
        }
        with self._autocast():
            batch["old_logps"] = self.completion_logps(self.model, batch) * batch["loss_mask"]
            batch["ref_logps"] = self.reference_logps(batch) * batch["loss_mask"]
            batch["values"] = self.completion_values(self.critic, batch) * batch["loss_mask"]
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
        return [group.tolist() for group in np.array_split(order, self.config.num_mini_batches) if len(group)]

    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """ppo_epochs x num_mini_batches policy steps (the loop's optimizer_step) and critic steps on one rollout."""
        self.update_history = []
        for epoch in range(self.config.ppo_epochs):
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
        return self.config.ppo_epochs * min(self.config.num_mini_batches, self.config.gradient_accumulation_steps)

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["loss_mask"].sum())

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        """Clipped surrogate summed over completion tokens / the step's tokens (all micro-batches, all ranks)."""
        mask = batch["loss_mask"]
        logps = self.completion_logps(model, batch)  # (N, C)
        per_token = self.policy_loss(logps, batch["old_logps"], batch["advantages"], mask)  # (N, C), 0 where masked
        log_ratio = (logps.detach() - batch["old_logps"]) * mask
        ratio = torch.exp(log_ratio)
        low, high = clipped_tokens(ratio, batch["advantages"], mask, clip_eps=self.config.epsilon,
                                   clip_eps_high=self.config.epsilon_high)
        metrics = {
            "policy/clipfrac": low + high,
            "policy/approx_kl": (0.5 * log_ratio**2).sum(),  # E[(log rho)^2] / 2 (Schulman's k2) per token
            "policy/ratio_deviation": ((ratio - 1).abs() * mask).sum(),  # 0 exactly when every ratio is 1
        }
        return per_token.sum() / max(num_items, 1), metrics

    def critic_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One step of the critic's own optimiser on these micro-batches, normalised like the policy's step."""
        config, critic = self.config, self.train_critic
        critic.train()
        num_items = float(all_reduce_sum(torch.tensor(float(sum(self.count_items(b) for b in micro_batches)),
                                                      device=self.device)))
        sums = torch.zeros(2, device=self.device)  # value loss, clipped values
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with (parallel.no_sync(critic) if not sync else contextlib.nullcontext()), self._autocast():
                values = self.completion_values(critic, batch)
                mask = batch["loss_mask"]
                loss = config.vf_coef * self.value_loss(values, batch["values"], batch["returns"], mask) / max(num_items, 1.0)
            (loss * self.dist.world_size).backward()
            clipped = ((values.detach() - batch["values"]).abs() > config.value_clip) & mask.bool()
            sums += torch.stack([loss.detach() / config.vf_coef, clipped.sum().float()])
        grad_norm = self.critic_optimizer.step()
        value_loss, clipped = all_reduce_sum(sums).tolist()
        return {"train/value/loss": value_loss, "train/value/clipfrac": clipped / max(num_items, 1.0),
                "train/value/grad_norm": grad_norm}

    # ---------------------------------------------------------------------------------------- metrics
    def _record_experience_metrics(self, prepared: list[dict[str, torch.Tensor]], kl_coef: float) -> None:
        """Rollout statistics over all ranks; then the adaptive KL controller sees this step's KL."""
        device = self.device
        sums = torch.zeros(9, dtype=torch.float64, device=device)
        for b in prepared:
            mask = b["loss_mask"]
            k1 = ((b["old_logps"] - b["ref_logps"]) * mask).sum(-1)  # per-sequence KL estimates
            k3 = (k3_kl(b["old_logps"], b["ref_logps"]) * mask).sum(-1)
            sums += torch.stack([
                torch.tensor(float(mask.shape[0]), device=device), b["scores"].sum(), (b["scores"] ** 2).sum(),
                b["non_score_rewards"].sum(), k1.sum(), k3.sum(), mask.sum().float(), b["truncated"].float().sum(),
                (b["entropies"] * mask).sum(),
            ]).double()
        n, score, score_sq, non_score, k1, k3, tokens, truncated, entropy = all_reduce_sum(sums).tolist()
        mismatch = max(float(((b["sampled_logps"] - b["old_logps"]).abs() * b["loss_mask"]).max()) for b in prepared)
        values = torch.cat([b["values"].flatten() for b in prepared])
        returns = torch.cat([b["returns"].flatten() for b in prepared])
        mask = torch.cat([b["loss_mask"].flatten() for b in prepared])
        score_mean = score / max(n, 1.0)
        metrics = {
            "train/score": score_mean,
            "train/score_std": max(score_sq - n * score_mean**2, 0.0) ** 0.5 / max(n - 1.0, 1.0) ** 0.5,
            "train/non_score_reward": non_score / max(n, 1.0),
            "train/rlhf_reward": score_mean + non_score / max(n, 1.0),
            "train/kl": k1 / max(n, 1.0), "train/kl_k3": k3 / max(n, 1.0), "train/kl_coef": kl_coef,
            "train/completions/mean_length": tokens / max(n, 1.0),
            "train/completions/truncated_ratio": truncated / max(n, 1.0),
            "train/entropy": entropy / max(tokens, 1.0),
            "train/value/explained_variance": explained_variance(values, returns, mask, reduce=all_reduce_sum),
            "train/logps_sampling_gap": mismatch,  # max |sampling log-prob - training forward's| (this rank)
        }
        self.record_metrics(metrics)
        self.kl_controller.update(k1 / max(n, 1.0), int(n))

    def _log_completions(self, dataset, indices: list[int], rewards: torch.Tensor, texts: list[str]) -> None:
        """A few prompts, completions and scores of this step, appended to completions.jsonl in the run folder."""
        step = self.global_step + 1
        records = [{"step": step, "prompt": dataset.prompts[index], "completion": text, "score": float(reward)}
                   for index, text, reward in list(zip(indices, texts, rewards.tolist()))[:SAMPLES_LOGGED]]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "completions.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewards of greedy completions of the eval prompts, summed."""
        dataset = self.prompt_dataset(batch)
        indices = batch["prompt_index"].tolist()
        rollout = self.sample_rollout([dataset.input_ids[j] for j in indices], greedy=True, generator=None)
        rewards, _, _ = self.score(dataset, indices, rollout)
        return {"reward_sum": rewards.sum().to(self.device), "prompts": torch.tensor(float(len(indices)), device=self.device),
                "length_sum": rollout.completion_lengths.sum().float().to(self.device)}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        prompts = max(totals.get("prompts", 0.0), 1.0)
        return {"eval_reward": totals.get("reward_sum", 0.0) / prompts,
                "eval_completion_length": totals.get("length_sum", 0.0) / prompts}

    # ------------------------------------------------------------------------------------ checkpoints
    def stage_state(self) -> dict[str, Any]:
        """The critic's weights and optimiser/schedule, and the KL coefficient (adaptive controller)."""
        return {"critic": {k: v.detach().cpu() for k, v in self.critic.state_dict().items()},
                "critic_optimizer": self.critic_optimizer.state_dict(), "kl_controller": self.kl_controller.state_dict()}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])


__all__ = ["PPOTrainer"]
