"""The losses as pure functions on tensors. Every one computes in float32 whatever the input dtype.

Shapes: B batch, T sequence, V vocabulary. Labels follow the Hugging Face convention: unshifted, the
function shifts (logits[:, :-1] predict labels[:, 1:]); positions labelled `ignore_index` do not count.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_time.loss.errors import LossConfigError, check_choice
from rlhf_time.loss.reduction import reduce

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _shift(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index  # (B, T-1)
    return logits, labels.masked_fill(~mask, 0), mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[int] = None, *,
             label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (maximum likelihood) on the positions whose label is not ignored.

    loss_t = -(1 - eps) log p(y_t) - eps / V sum_v log p(v)     (label smoothing: Szegedy et al. 2016, as torch's)
    mean: sum_t loss_t / #targets, or sum_t loss_t / num_items_in_batch when given (exact accumulation).
    """
    logits, targets, mask = _shift(logits, labels, ignore_index)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                label_smoothing=label_smoothing)  # (B, T-1)
    return reduce(per_token, mask, reduction, num_items_in_batch)


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  margin: Optional[torch.Tensor | float] = None, *, default_margin: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, InstructGPT eq. 1; margin as in Llama 2):

    loss = -log sigmoid(r_c - r_r - m)      r_c, r_r: (B,); m per example (NaN -> default margin) or a scalar
    """
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()  # (B,)
    m = torch.full_like(chosen, default_margin)
    if margin is not None:
        given = torch.as_tensor(margin, dtype=torch.float32, device=chosen.device).expand_as(chosen)
        m = torch.where(torch.isnan(given), m, given)
    per_pair = -F.logsigmoid(chosen - rejected - m)  # (B,)
    return reduce(per_pair, None, reduction)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7) and variants, with
    z = (pc - rc) - (pr - rr)  (summed completion log-probs, each (B,)):

    sigmoid: -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)   (eps: conservative DPO, Mitchell 2023)
    hinge:   relu(1 - beta z)                                             (SLiC, Zhao et al. 2023)
    ipo:     (z - 1 / (2 beta))^2                                         (IPO, Azar et al. 2023, eq. 17)
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    z = (policy_chosen_logps.float() - ref_chosen_logps.float()) - (
        policy_rejected_logps.float() - ref_rejected_logps.float())  # (B,)
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * z)
    else:  # ipo
        per_pair = (z - 1 / (2 * beta)) ** 2
    return reduce(per_pair, None, reduction)


def dpo_implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1):
    """DPO's implicit rewards for logging: beta (pc - rc) and beta (pr - rr), detached, each (B,)."""
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    return chosen.detach(), rejected.detach()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, reduction: str = "mean") -> torch.Tensor:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, all (B, T):

    rho = exp(logps - old_logps);  loss_t = max(-A_t rho, -A_t clip(rho, 1 - eps, 1 + eps_high))

    eps_high = eps unless given (DAPO's clip-higher, Yu et al. 2025). advantages may be (B,) (one per sequence,
    GRPO) or (B, T). old_logps and advantages are rollout constants: they are detached, so no gradient reaches a
    value head through advantages that were computed without .detach(). Masked positions may hold anything (e.g.
    -inf padding sentinels): they are zeroed before exp(), since 0 * the gradient of exp(inf) would still be NaN.
    """
    advantages = advantages.detach().float()
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): the sequence's advantage on each of its tokens
    logps, old_logps, advantages = _zero_masked(mask, logps.float(), old_logps.detach().float(), advantages)
    ratio = torch.exp(logps - old_logps)  # (B, T)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + high))
    return reduce(per_token, mask, reduction)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_eps: float = 0.2, reduction: str = "mean") -> torch.Tensor:
    """Clipped value loss of PPO implementations (Schulman et al. 2017; Andrychowicz et al. 2021), all (B, T):

    loss_t = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)      (old_values, returns detached)
    """
    # Masked positions are zeroed first so non-finite padding cannot turn their zero gradient into NaN.
    values, old_values, returns = _zero_masked(mask, values.float(), old_values.detach().float(), returns.detach().float())
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)  # (B, T)
    return reduce(per_token, mask, reduction)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 1.0, kind: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
            reduction: str = "mean") -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015) over the positions whose label is not ignored: the divergence
    of kd_divergence (below) between the models' next-token distributions, (B, T, V) logits each."""
    student, _, mask = _shift(student_logits, labels, ignore_index)  # (B, T-1, V)
    teacher = teacher_logits[:, :-1]  # (B, T-1, V)
    per_token = kd_divergence(student, teacher, temperature=temperature, kind=kind, beta=beta)  # (B, T-1)
    return reduce(per_token, mask, reduction)


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence of two next-token distributions, (..., V) logits -> (...), in float32.

    p = softmax(logits / tau):
    forward_kl: tau^2 KL(p_T || p_S)   (Hinton et al. 2015)
    reverse_kl: tau^2 KL(p_S || p_T)   (Gu et al. 2024, MiniLLM)
    jsd:        tau^2 [beta KL(p_T || M) + (1 - beta) KL(p_S || M)],  M = beta p_T + (1 - beta) p_S
                (generalised JSD, Agarwal et al. 2024, GKD)
    The tau^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    At beta = 0 or 1 the jsd formula is identically 0 (M equals one of the two distributions), so, as in TRL's
    GKD, jsd with beta = 0 is forward_kl and with beta = 1 is reverse_kl. beta outside [0, 1] is an error.
    """
    check_choice("kind", kind, KD_KINDS)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise LossConfigError(f"kd: beta={beta!r} must be in [0, 1] (0 = forward_kl, 1 = reverse_kl)")
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, kind)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:  # jsd
        # log p_T - log M = -log1p((1 - beta) expm1(log p_S - log p_T)), and symmetrically for the student: exact
        # where the two distributions are close, where log p - log M would cancel to rounding noise. Ratios are
        # capped at e^80: beyond it the weighting probability is below e^-80 of the other's.
        kl_t = -(log_t.exp() * torch.log1p((1 - beta) * torch.expm1((log_s - log_t).clamp(max=80)))).sum(-1)
        kl_s = -(log_s.exp() * torch.log1p(beta * torch.expm1((log_t - log_s).clamp(max=80)))).sum(-1)
        per_token = beta * kl_t + (1 - beta) * kl_s
    return per_token * temperature**2


def _zero_masked(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with 0 wherever mask is 0 (replaced, not multiplied, so NaN/inf there disappear)."""
    keep = mask.bool()
    return tuple(torch.where(keep, t, torch.zeros_like(t)) for t in tensors)
