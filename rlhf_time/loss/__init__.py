"""Losses as pure functions, `create_loss` to pick one by name, and the memory-lean log-prob helpers."""

from rlhf_time.loss.distill import chunked_kd_loss
from rlhf_time.loss.errors import LossConfigError
from rlhf_time.loss.functions import (dpo_implicit_rewards, dpo_loss, kd_divergence, kd_loss, pairwise_loss,
                                      policy_loss, sft_loss, value_loss)
from rlhf_time.loss.grpo import (aggregate_loss, clipped_tokens, discounted_returns, group_advantages, k3_kl, loss_items,
                                 rloo_advantages, sequence_mean, truncated_importance_weights, whiten_over_step)
from rlhf_time.loss.kto import KTO_LOSS_TYPES, kto_kl_estimate, kto_loss
from rlhf_time.loss.logps import (DEFAULT_CHUNK_BYTES, chunk_rows, chunked_sequence_logps, chunked_sft_loss,
                                  chunked_token_logps, label_cross_entropy_and_hits, sequence_logps, token_entropy,
                                  token_logps)
from rlhf_time.loss.ppo import (AdaptiveKLController, explained_variance, gae, masked_moments, masked_whiten,
                                mean_and_variance, token_rewards)
from rlhf_time.loss.reduction import masked_mean
from rlhf_time.loss.reference_free import log1mexp, orpo_odds_ratio_loss, simpo_loss
from rlhf_time.loss.registry import LOSSES, create_loss

__all__ = [
    "create_loss", "LOSSES", "LossConfigError", "sft_loss", "pairwise_loss", "dpo_loss", "dpo_implicit_rewards",
    "policy_loss", "value_loss", "kd_loss", "kd_divergence", "chunked_kd_loss", "masked_mean", "sequence_logps",
    "token_logps", "chunked_sft_loss", "chunked_sequence_logps", "chunk_rows", "DEFAULT_CHUNK_BYTES",
    "label_cross_entropy_and_hits",
    "chunked_token_logps", "token_entropy", "group_advantages", "k3_kl", "aggregate_loss", "loss_items", "clipped_tokens",
    "gae", "masked_whiten", "masked_moments", "mean_and_variance", "token_rewards", "explained_variance",
    "AdaptiveKLController", "orpo_odds_ratio_loss", "simpo_loss", "log1mexp", "kto_loss", "kto_kl_estimate",
    "KTO_LOSS_TYPES", "rloo_advantages", "sequence_mean", "truncated_importance_weights", "discounted_returns",
    "whiten_over_step",
]
