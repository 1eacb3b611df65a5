"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): a loss on unpaired
completions labelled desirable or undesirable, and its KL reference point."""

from __future__ import annotations

import torch

from rlhf_time.loss.reduction import reduce

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float = 0.0, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto", reduction: str = "mean") -> torch.Tensor:
    """Per example, with r = log pi(y|x) - log pi_ref(y|x) (summed over the completion's tokens) and z_ref = kl:

    kto:                desirable   lambda_D (1 - sigmoid(beta (r - z_ref)))
                        undesirable lambda_U (1 - sigmoid(beta (z_ref - r)))
    apo_zero_unpaired:  desirable   lambda_D (1 - sigmoid(beta r))       (D'Oosterlinck et al. 2024, unpaired APO-zero)
                        undesirable lambda_U sigmoid(beta r)

    z_ref (see kto_kl_estimate) is a detached constant; the paper's lambda_D, lambda_U are desirable_weight and
    undesirable_weight. TRL's KTOTrainer averages these per-example losses over the batch (reduction "mean").
    """
    logratio = policy_logps.float() - reference_logps.float()  # (B,)
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device)
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (logratio - kl)), 1 - torch.sigmoid(beta * (kl - logratio))
    else:
        good, bad = 1 - torch.sigmoid(beta * logratio), torch.sigmoid(beta * logratio)
    per_example = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return reduce(per_example, None, reduction)


def kto_kl_estimate(mismatched_logratio_sum: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """KTO's reference point z_ref = max(0, mean over mismatched pairs (x, y') of log pi(y'|x) - log pi_ref(y'|x)),
    detached: y' is a completion given to another example's prompt, so it estimates KL(pi || pi_ref) without
    favouring the matched completions. Takes the sum of the log-ratios over all pairs of the step (every
    micro-batch and rank) and their count."""
    return (mismatched_logratio_sum.detach().float() / max(float(count), 1.0)).clamp(min=0)
