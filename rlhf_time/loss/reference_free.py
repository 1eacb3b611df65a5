"""Reference-free preference losses: ORPO and SimPO. Both read length-averaged log-probs of the completion
tokens, avg(y) = (1/|y|) sum_t log pi(y_t | x, y_<t), |y| the completion's target tokens (the end-of-turn token
included, prompt and padding excluded); no reference model takes part."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_time.loss.reduction import reduce


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *,
                         reduction: str = "mean") -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7), per pair:

    log odds(y) = log p(y) - log(1 - p(y)),  log p(y) = avg(y)  (the length-averaged log-prob)
    loss_OR     = -log sigmoid(log odds(y_w) - log odds(y_l))

    The full ORPO loss is NLL(y_w) + lambda * loss_OR (the stage adds the NLL over the step's chosen tokens).
    """
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    return reduce(-F.logsigmoid(log_odds), None, reduction)


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), per pair, with z = beta * (avg(y_w) - avg(y_l)) - gamma:

    loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)     (eps: label smoothing, 0 in the paper)
    """
    z = beta * (chosen_avg_logps.float() - rejected_avg_logps.float()) - gamma  # (B,)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return reduce(per_pair, None, reduction)
