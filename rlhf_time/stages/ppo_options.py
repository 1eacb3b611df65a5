"""Options of stage ppo: the section `ppo` (sampling and rewards: the shared section `rollout`)."""

from __future__ import annotations

from typing import ClassVar, Optional

from rlhf_time.stages.section import Section, option


class PPOOptions(Section):
    """ppo: the critic, GAE, the passes over each rollout and the KL-penalised reward."""

    former_names: ClassVar[dict[str, str]] = {
        "kl_coef": "kl_coef", "value_model": "value_model", "critic_learning_rate": "critic_learning_rate",
        "ppo_epochs": "epochs",
        "num_mini_batches": "num_mini_batches", "gamma": "gamma", "lam": "lam", "vf_coef": "vf_coef",
        "value_clip": "value_clip", "reward_clip": "reward_clip", "entropy_coef": "entropy_coef",
        "whiten_rewards": "whiten_rewards", "whiten_advantages": "whiten_advantages",
        "missing_eos_penalty": "missing_eos_penalty", "kl_target": "kl_target", "kl_horizon": "kl_horizon"}

    value_model: Optional[str] = option(
        None, "Critic start: a folder trained with stage rm, or 'policy' (the policy's weights + a new value head); "
              "None = rollout.reward_model when set, else 'policy'.")
    critic_learning_rate: Optional[float] = option(
        None, "Peak learning rate of the critic's own AdamW (the policy's schedule shape); None = the policy's "
              "learning_rate (as in TRL, where one optimiser trains both).", gt=0)
    epochs: int = option(4, "Passes over each rollout.", gt=0)
    num_mini_batches: int = option(1, "Optimiser steps per pass; the step's micro-batches are split into this many groups.", gt=0)
    gamma: float = option(1.0, "Discount of GAE.", ge=0, le=1)
    lam: float = option(0.95, "Lambda of GAE (0 = one-step TD, 1 = Monte Carlo returns).", ge=0, le=1)
    kl_coef: float = option(0.05, "Weight of the per-token KL penalty to the reference policy in the reward.", ge=0)
    kl_target: Optional[float] = option(None, "Adaptive KL controller target (per-sequence KL); None = fixed kl_coef.", gt=0)
    kl_horizon: float = option(10000.0, "Adaptive KL controller horizon in sequences (Ziegler et al. 2019).", gt=0)
    vf_coef: float = option(0.1, "Weight of the clipped value loss in the critic's loss.", gt=0)
    value_clip: float = option(0.2, "Values move at most this far from their rollout values (clipped value loss).", gt=0)
    reward_clip: Optional[float] = option(None, "Clip sequence scores to [-reward_clip, reward_clip]; None = no clipping.", gt=0)
    entropy_coef: float = option(0.0, "Weight of the entropy bonus: the policy loss minus entropy_coef x the policy's mean token entropy.", ge=0)
    whiten_rewards: bool = option(False, "Scale sequence scores to unit variance over the step's rollout (all ranks).")
    whiten_advantages: bool = option(True, "Whiten advantages over the completion tokens of the step (all ranks).")
    missing_eos_penalty: Optional[float] = option(
        None, "Subtracted from the score of completions that hit max_completion_length without a stop token.", ge=0)
