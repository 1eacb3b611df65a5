"""Loss edge cases: JSD endpoints are the KL kinds, and non-finite values at masked positions give no NaN gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_time.loss import create_loss
from rlhf_time.loss.errors import LossConfigError


def _kd_inputs():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    return student, teacher, labels


@pytest.mark.parametrize("beta, reference_direction", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_the_kl_divergences_with_a_gradient(beta, reference_direction):
    student, teacher, labels = _kd_inputs()
    loss = create_loss("kd", kind="jsd", beta=beta)(student, teacher, labels)
    s, t = student[:, :-1].reshape(-1, 7), teacher[:, :-1].reshape(-1, 7)
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    # KL(p || q) = sum p (log p - log q), written out.
    reference = (log_t.exp() * (log_t - log_s)).sum(-1).mean() if reference_direction == "forward" else \
        (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    torch.testing.assert_close(loss, reference)
    assert loss.item() > 1e-3
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_jsd_beta_outside_unit_interval_is_rejected(beta):
    student, teacher, labels = _kd_inputs()
    with pytest.raises(LossConfigError, match="beta"):
        create_loss("kd", kind="jsd", beta=beta)(student, teacher, labels)


def _masked_batch():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    torch.manual_seed(1)
    logps = (-torch.rand(2, 4)).requires_grad_()
    return mask, logps


def test_policy_loss_ignores_non_finite_padding_in_value_and_gradient():
    mask, logps = _masked_batch()
    old = torch.full((2, 4), -math.inf)  # padding sentinel
    old[mask.bool()] = -0.5
    advantages = torch.tensor([[1.0, -2.0, math.nan, math.inf], [0.5, math.inf, -math.inf, math.nan]])
    loss = create_loss("policy", clip_eps=0.2)(logps, old, advantages, mask)
    (grad,) = torch.autograd.grad(loss, logps)
    # Reference on the three unmasked tokens only: mean of max(-A rho, -A clip(rho)).
    keep = mask.bool()
    rho = torch.exp(logps.detach()[keep] - old[keep])
    adv = advantages[keep]
    expected = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(grad).all() and (grad[~keep] == 0).all()


def test_value_loss_ignores_non_finite_padding_in_value_and_gradient():
    mask, values = _masked_batch()
    old_values = torch.where(mask.bool(), torch.tensor(0.1), torch.tensor(math.nan))
    returns = torch.where(mask.bool(), torch.tensor(0.3), torch.tensor(-math.inf))
    loss = create_loss("value", clip_eps=0.2)(values, old_values, returns, mask)
    (grad,) = torch.autograd.grad(loss, values)
    keep = mask.bool()
    v = values.detach()[keep]
    clipped = 0.1 + (v - 0.1).clamp(-0.2, 0.2)
    expected = (0.5 * torch.maximum((v - 0.3) ** 2, (clipped - 0.3) ** 2)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(grad).all() and (grad[~keep] == 0).all()
