"""GRPO's pure pieces: group-relative advantages, the k3 KL estimator, and the three loss aggregations.

Shapes: N completions (= prompts x G, a prompt's G completions adjacent), C completion positions.
The per-token surrogate itself is `policy_loss` (functions.py) with clip-higher.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_time.loss.errors import check_choice

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group",
                     batch_std: Optional[float | torch.Tensor] = None, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2), (N,) float32:

    A_i = (r_i - mean(r_group)) / (s + eps),  s = std(r_group) (group) | std of all N rewards (batch) | 1 (none)

    std is the sample standard deviation (Bessel-corrected); "none" is Dr. GRPO (Liu et al. 2025), which drops
    the division. A group whose rewards are all equal gets A = 0 exactly (no gradient), not the rounding error of
    r - mean. batch_std: the std over the global batch when the batch is split over ranks (None: these N rewards).
    """
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of num_generations={num_generations}")
    grouped = rewards.float().view(-1, num_generations)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        std = rewards.float().std() if batch_std is None else torch.as_tensor(batch_std, dtype=torch.float32)
        centred = centred / (std + eps)
    equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (P, 1)
    return torch.where(equal, torch.zeros_like(centred), centred).view(-1)


def rloo_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "none",
                    batch_std: Optional[float | torch.Tensor] = None, eps: float = 1e-4) -> torch.Tensor:
    """Leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics", RLOO), (N,) float32:

    A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r_group))

    verl's compute_rloo_outcome_advantage computes the right-hand side. No std scaling unless scale_rewards asks
    for it (group: / (std(r_group) + eps), batch: / (std of all rewards + eps), as group_advantages). A group whose
    rewards are all equal gets exactly 0.
    """
    if num_generations < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (num_generations >= 2)")
    scaled = group_advantages(rewards, num_generations, scale_rewards=scale_rewards, batch_std=batch_std, eps=eps)
    return scaled * (num_generations / (num_generations - 1))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Per-token returns of each completion, (N, C): G_t = r_t + gamma * G_{t'}, t' the next sampled token,
    nothing flowing back from past the completion's last token; 0 where masked (REINFORCE++, Hu 2025; OpenRLHF's
    get_cumulative_returns). Masked tokens inside a completion (a multi-turn episode's tool results) are skipped:
    the return of a later turn flows back to the earlier ones."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, 0.0)
    return returns


def whiten_over_step(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """REINFORCE++'s global advantage normalisation (OpenRLHF), (N, C), 0 where masked:

    A' = (A - mu) * max(var, 1e-8)^(-1/2),  mu, var = mean and (biased) variance of every token of the step

    `moments` = masked_moments (count, sum, sum of squares) summed over the step's micro-batches and ranks, so the
    result does not depend on how the step is split. (verl's masked_whiten divides by sqrt(var + 1e-8) with a
    Bessel-corrected variance; OpenRLHF's form is used here.)
    """
    count, total, squares = (float(x) for x in moments)
    mean = total / max(count, 1.0)
    variance = max(squares / max(count, 1.0) - mean**2, 0.0)
    whitened = (values.float() - mean) * max(variance, 1e-8) ** -0.5
    return torch.where(mask.bool(), whitened, 0.0)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C): each row's mean over its masked positions, on every position. GSPO's sequence-level log-ratio
    (Zheng et al. 2025) is sequence_mean(logp) - sequence_mean(logp_old) = mean_t(logp_t - logp_old_t), whose
    gradient reaches each token with weight 1 / |y|."""
    mask = mask.to(values.dtype)
    mean = (values * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return mean.expand_as(values)


def truncated_importance_weights(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025; TRL's vllm_importance_sampling_correction), (N, C), detached:

    w_t = min(pi_train(y_t) / pi_sampler(y_t), cap)

    the correction for tokens sampled by an engine whose probabilities differ from the training forward's.
    """
    return torch.exp(train_logps.detach().float() - sampler_logps.detach().float()).clamp(max=cap)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from tokens sampled from pi (Schulman 2020, "Approximating KL"):

    k3 = exp(ref - logp) - (ref - logp) - 1  >= 0, unbiased, low variance; 0 where the policies agree.
    Computed as expm1(d) - d: exp(d) - 1 in float32 would round a small KL (d ~ 1e-4, k3 ~ 5e-9) to 0.
    """
    delta = ref_logps.float() - logps.float()
    return torch.expm1(delta) - delta


def loss_items(mask: torch.Tensor, loss_type: str) -> int:
    """What a step's loss is divided by: completion tokens (dapo), or sequences with a loss token (grpo, dr_grpo)."""
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    if loss_type == "dapo":
        return int(mask.sum())
    return int(mask.any(dim=-1).sum())


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", *,
                   max_completion_length: Optional[int] = None,
                   num_items: Optional[int | torch.Tensor] = None) -> torch.Tensor:
    """Reduce per-token losses (N, C) with their mask to the loss, n = num_items (default: of this batch):

    grpo:    sum_i [sum_t l_it m_it / sum_t m_it] / n          n = sequences      (Shao et al. 2024, eq. 3)
    dr_grpo: sum_i sum_t l_it m_it / (n * max_completion_length)   n = sequences  (Liu et al. 2025, Dr. GRPO)
    dapo:    sum_i sum_t l_it m_it / n                         n = tokens         (Yu et al. 2025, DAPO, eq. 8)

    Passing the whole optimiser step's n (all micro-batches, all ranks) makes accumulation and data parallelism
    exact: the micro-batch losses then add up to the step's loss.
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    mask = mask.bool()
    kept = torch.where(mask, per_token.float(), torch.zeros_like(per_token, dtype=torch.float32))  # (N, C)
    if num_items is None:
        num_items = loss_items(mask, loss_type)
    if loss_type == "grpo":
        total = (kept.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        total = kept.sum() / max_completion_length
    else:
        total = kept.sum()
    if isinstance(num_items, torch.Tensor):
        return total / num_items.to(total.dtype).clamp(min=1.0)
    return total / max(num_items, 1)


def clipped_tokens(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
                   clip_eps_high: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens clipped low, tokens clipped high), summed over the mask: the clip stops the gradient of a token
    when rho < 1 - eps with A < 0 (low) or rho > 1 + eps_high with A > 0 (high). advantages (N,) or (N, C)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.bool()
    low_clipped = (ratio < 1 - clip_eps) & (advantages < 0) & mask
    high_clipped = (ratio > 1 + high) & (advantages > 0) & mask
    return low_clipped.sum().float(), high_clipped.sum().float()
