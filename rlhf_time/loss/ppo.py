"""PPO's pure pieces (InstructGPT-style RLHF): per-token rewards, GAE, masked whitening, the adaptive KL controller,
and the diagnostics of an update (explained variance).

Shapes: B completions, C completion positions; `mask` (B, C) marks each completion's sampled tokens (the stop token
included), a prefix of its row: rows are right-padded to the longest completion, so completions differ in length.
"""

from __future__ import annotations

from typing import Optional

import torch


def token_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF with a KL penalty (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), (B, C) each:

    r_t = -kl_coef * (logp_t - ref_logp_t)  +  score * [t = last token of the completion]

    Returns (rewards, non_score_rewards = the KL part alone); both 0 where masked. `scores` (B,) is the sequence
    score (reward model / reward functions, after any clipping or whitening).
    """
    mask = mask.bool()
    non_score = torch.where(mask, -kl_coef * (logps.float() - ref_logps.float()), torch.zeros_like(logps, dtype=torch.float32))
    # (B,) index of each completion's last sampled token (a multi-turn episode has context tokens between turns)
    last = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)
    has_token = mask.any(-1)
    bonus = torch.zeros_like(non_score).scatter(-1, last[:, None], torch.where(has_token, scores.float(), 0.0)[:, None])
    return non_score + bonus, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per completion, (B, C) each:

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   returns_t = A_t + V_t

    with V_{t+1} = A_{t+1} = 0 past a completion's last token (the episode ends there; padding is never
    bootstrapped from). Advantages and returns are 0 where masked. Values and rewards are treated as constants.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.detach().float(), 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        alive = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(alive, advantage, 0.0)
        # A masked position ends the episode: nothing flows back through it.
        next_value = torch.where(alive, values[:, t], 0.0)
        next_advantage = advantages[:, t]
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of the unmasked entries, float64 (3,): summed over ranks, they give the
    global mean and variance for masked_whiten."""
    mask = mask.bool()
    kept = torch.where(mask, values.double(), 0.0)
    return torch.stack([mask.sum().double(), kept.sum(), (kept**2).sum()])


def mean_and_variance(moments: torch.Tensor) -> tuple[float, float]:
    """(mean, Bessel-corrected variance) from masked_moments' (count, sum, sum of squares)."""
    count, total, squares = moments.tolist()
    mean = total / max(count, 1.0)
    return mean, max(squares - count * mean**2, 0.0) / max(count - 1.0, 1.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  moments: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """Whitening over the unmasked entries only (masked entries neither count nor change; they come back 0):

    x' = (x - mu) / sqrt(var + eps)   (shift_mean=False adds mu back: scale only)
    mu, var: mean and Bessel-corrected variance of the unmasked entries, from `moments` (masked_moments summed
    over ranks) when given, else from these values.
    """
    mask = mask.bool()
    mean, variance = mean_and_variance(moments if moments is not None else masked_moments(values, mask))
    whitened = (values.float() - mean) / (variance + eps) ** 0.5
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                       reduce=None) -> float:
    """1 - Var(returns - values) / Var(returns) over unmasked entries: 1 = the critic predicts the returns
    perfectly, 0 = no better than their mean, < 0 = worse. `reduce` (e.g. a sum over ranks) is applied to the
    moments first, so every rank gets the value of the global batch."""
    both = torch.stack([masked_moments(returns.float() - values.float(), mask), masked_moments(returns.float(), mask)])
    if reduce is not None:
        both = reduce(both)
    (_, residual), (count, variance) = mean_and_variance(both[0]), (float(both[1][0]), mean_and_variance(both[1])[1])
    if count < 2 or variance <= 0:
        return float("nan")
    return 1.0 - residual / variance


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (sec. 2.2), steering the measured KL towards a target:

    e = clip(KL / kl_target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / kl_horizon)

    where KL is the mean per-sequence KL of the last rollout and n the sequences it held. kl_target=None keeps beta
    fixed (update does nothing). state_dict / load_state_dict make a resumed run continue with the same beta.
    """

    def __init__(self, kl_coef: float, kl_target: Optional[float] = None, kl_horizon: float = 10000.0) -> None:
        self.value, self.target, self.horizon = float(kl_coef), kl_target, float(kl_horizon)

    def update(self, current_kl: float, num_sequences: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * num_sequences / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
