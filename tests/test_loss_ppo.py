"""PPO's pure pieces against written-out references (per-sequence Python recursions, explicit formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_time.loss import create_loss
from rlhf_time.loss.ppo import (AdaptiveKLController, explained_variance, gae, masked_moments, masked_whiten,
                                token_rewards)


def _random_rollout(seed: int, lengths: list[int], width: int):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(lengths), width, generator=generator)
    values = torch.randn(len(lengths), width, generator=generator)
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    # Padding holds garbage, as a right-padded batch may: it must not leak into anything.
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask, values, torch.full_like(values, -1e6))
    return rewards, values, mask


def _reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """The textbook backward recursion over one episode of len(rewards) steps, terminal value 0."""
    n = len(rewards)
    advantages = [0.0] * n
    running = 0.0
    for t in range(n - 1, -1, -1):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_and_returns_equal_the_written_out_recursion_for_different_lengths(gamma, lam):
    lengths = [7, 1, 4, 0, 7, 3]
    rewards, values, mask = _random_rollout(0, lengths, 7)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for row, n in enumerate(lengths):
        expected_a, expected_r = _reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[row, :n], torch.tensor(expected_a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(returns[row, :n], torch.tensor(expected_r), rtol=1e-5, atol=1e-5)
        assert advantages[row, n:].eq(0).all() and returns[row, n:].eq(0).all()


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = _random_rollout(1, [5, 2], 5)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.where(mask, rewards, 0.0).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(returns, torch.where(mask, to_go, 0.0))
    torch.testing.assert_close(advantages, torch.where(mask, to_go - values, 0.0))


def test_whitening_ignores_masked_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -50.0, 7.0, 1e9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]]).bool()
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0])
    mean, std = kept.mean(), kept.std()  # Bessel-corrected, as torch's default
    whitened = masked_whiten(values, mask, eps=0.0)
    torch.testing.assert_close(whitened[mask], (kept - mean) / std)
    assert whitened[~mask].eq(0).all()
    # Changing a masked entry changes nothing.
    other = values.clone()
    other[~mask] = torch.tensor([-3.0, 5.0, 0.5])
    torch.testing.assert_close(masked_whiten(other, mask, eps=0.0), whitened)
    # scale only
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False, eps=0.0)[mask], (kept - mean) / std + mean)


def test_whitening_with_moments_of_two_shards_equals_whitening_the_union():
    values, mask = torch.randn(4, 6), torch.rand(4, 6) > 0.3
    moments = masked_moments(values[:2], mask[:2]) + masked_moments(values[2:], mask[2:])
    torch.testing.assert_close(masked_whiten(values[:2], mask[:2], moments=moments), masked_whiten(values, mask)[:2])


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_everywhere():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    rewards, non_score = token_rewards(logps, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    expected_kl = torch.tensor([[-0.05, 0.1, 0.0], [0.02, 0.0, 0.0]])
    torch.testing.assert_close(non_score, expected_kl)
    torch.testing.assert_close(rewards, expected_kl + torch.tensor([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]]))
    # policy == reference: the KL penalty is exactly 0 and the reward is the score alone
    rewards, non_score = token_rewards(logps, logps, torch.tensor([2.0, -1.0]), mask, kl_coef=0.5)
    assert non_score.eq(0).all() and rewards.sum().item() == 1.0


def test_value_loss_is_clipped_around_the_old_values():
    values, old, returns = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # t0: clipped value 0.2 -> (0.2-2)^2 = 3.24 > (1-2)^2 = 1; t1: (-1-0.5)^2 = 2.25 > (-0.2-0.5)^2 = 0.49
    expected = 0.5 * (3.24 + 2.25) / 2
    assert create_loss("value", clip_eps=0.2)(values, old, returns, mask).item() == pytest.approx(expected)


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1, 1, 1, 0]]).bool()
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    values = torch.tensor([[1.5, 2.0, 2.5, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(1 - torch.tensor([-0.5, 0.0, 0.5]).var().item() / 1.0)


def test_adaptive_kl_controller_follows_ziegler_and_round_trips_its_state():
    controller = AdaptiveKLController(0.1, kl_target=6.0, kl_horizon=100.0)
    assert controller.update(9.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped to +0.2
    assert controller.update(5.4, 10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    restored = AdaptiveKLController(0.1, kl_target=6.0, kl_horizon=100.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(100.0, 10) == 0.1
    assert math.isfinite(controller.value)


@pytest.mark.parametrize("from_hidden", [False, True])
def test_token_entropy_equals_categorical_entropy_and_its_gradient(from_hidden):
    from rlhf_time.loss import token_entropy

    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 2, 7, 5, 11
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    states = torch.randn(batch, length, hidden_size if from_hidden else vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :3] = -100  # a prompt: no entropy there
    labels[1, -2:] = -100  # padding
    kwargs = dict(lm_head_weight=weight, lm_head_bias=bias) if from_hidden else {}
    got = token_entropy(states, labels, chunk_size=3, **kwargs)
    logits = states @ weight.T + bias if from_hidden else states
    expected = torch.distributions.Categorical(logits=logits[:, :-1]).entropy() * (labels[:, 1:] != -100)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got[labels[:, 1:] == -100] == 0)
    upstream = torch.randn_like(got)
    inputs = (states, weight, bias) if from_hidden else (states,)
    grads = torch.autograd.grad((got * upstream).sum(), inputs)
    reference = torch.autograd.grad((expected * upstream).sum(), inputs)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
