"""GRPO's pure functions against hand-computed values and written-out formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_time.loss import create_loss
from rlhf_time.loss.errors import LossConfigError
from rlhf_time.loss.grpo import aggregate_loss, clipped_tokens, group_advantages, k3_kl, loss_items


def test_group_advantages_by_hand_for_each_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G=4; the second is flat
    group_std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    expected_first = torch.tensor([0.5, -0.5, -0.5, 0.5])
    by_group = group_advantages(rewards, 4, scale_rewards="group")
    torch.testing.assert_close(by_group[:4], expected_first / (group_std + 1e-4))
    batch_std = math.sqrt((2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7)  # mean 1.25 over all eight
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="batch")[:4],
                               expected_first / (batch_std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="none")[:4], expected_first)
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="batch", batch_std=2.0)[:4],
                               expected_first / (2.0 + 1e-4))
    for scale in ("group", "batch", "none"):  # the flat group gives exactly nothing
        assert torch.equal(group_advantages(rewards, 4, scale_rewards=scale)[4:], torch.zeros(4))


def test_group_advantages_sum_to_zero_and_flat_groups_are_exactly_zero():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6 * 5, generator=g)
    for scale in ("group", "batch", "none"):
        sums = group_advantages(rewards, 5, scale_rewards=scale).view(6, 5).sum(1)
        torch.testing.assert_close(sums, torch.zeros(6), atol=1e-5, rtol=0)
    flat = torch.full((3,), 0.1)  # 0.1 + 0.1 + 0.1 != 0.3 in floating point: r - mean is not 0 by itself
    assert torch.equal(group_advantages(flat, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(LossConfigError, match="scale_rewards='std'; valid: group, batch, none"):
        group_advantages(torch.zeros(4), 4, scale_rewards="std")


def test_k3_by_hand_and_its_expectation_is_the_kl():
    value = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    small = k3_kl(torch.tensor([0.0]), torch.tensor([1e-4]))  # float32 exp(d) - d - 1 would give 0
    assert small.item() == pytest.approx(math.expm1(1e-4) - 1e-4, rel=1e-3) and small.item() > 0
    # Over tokens drawn from p, E_p[k3] = KL(p || q) exactly: weight each token by p.
    p = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0)
    q = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.0]), 0)
    expected = F.kl_div(q.log(), p, reduction="sum")  # KL(p || q)
    torch.testing.assert_close((p * k3_kl(p.log(), q.log())).sum(), expected)


def test_the_three_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the third completion is masked out entirely
    assert loss_items(mask, "grpo") == loss_items(mask, "dr_grpo") == 2 and loss_items(mask, "dapo") == 4
    assert aggregate_loss(per_token, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(10 / (2 * 4))
    assert aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "dapo", num_items=8).item() == pytest.approx(10 / 8)
    assert aggregate_loss(per_token, mask, "dapo", num_items=torch.tensor(5)).item() == pytest.approx(10 / 5)
    with pytest.raises(LossConfigError, match="valid: grpo, dr_grpo, dapo"):
        aggregate_loss(per_token, mask, "token_mean")


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_losses_add_up_to_the_step_loss(loss_type):
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    whole = aggregate_loss(per_token, mask, loss_type, max_completion_length=5)
    n = loss_items(mask, loss_type)
    parts = sum(aggregate_loss(per_token[s], mask[s], loss_type, max_completion_length=5, num_items=n)
                for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole)


def test_clip_higher_surrogate_and_clip_counts_by_hand():
    ratio = torch.tensor([[1.5, 1.25, 0.5, 0.7]])
    logps = ratio.log().requires_grad_()
    advantages = torch.tensor([2.0])  # one per sequence, broadcast over its tokens
    mask = torch.tensor([[1, 1, 1, 0]])
    per_token = create_loss("policy", clip_eps=0.2, clip_eps_high=0.28, reduction="none")(
        logps, torch.zeros(1, 4), advantages, mask)
    # 1.5 -> clipped at 1.28; 1.25 < 1.28 -> unclipped (symmetric eps would clip it at 1.2); 0.5 with A > 0: -A rho
    torch.testing.assert_close(per_token, torch.tensor([[-2 * 1.28, -2 * 1.25, -2 * 0.5, 0.0]]))
    symmetric = create_loss("policy", clip_eps=0.2, reduction="none")(logps, torch.zeros(1, 4), advantages, mask)
    torch.testing.assert_close(symmetric[0, 1], torch.tensor(-2 * 1.2))
    aggregate_loss(per_token, mask, "dapo").backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 3] == 0
    assert logps.grad[0, 1].item() == pytest.approx(-2 * 1.25 / 3)
    low, high = clipped_tokens(ratio, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert (low.item(), high.item()) == (0, 1)
    low, high = clipped_tokens(ratio, -advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert (low.item(), high.item()) == (1, 0)  # 0.5 < 0.8 with A < 0; the masked 0.7 does not count


def test_chunked_token_logps_equal_full_logits_log_softmax_with_gradients():
    from rlhf_time.loss import chunked_token_logps

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5] = -100  # padding
    got = chunked_token_logps(hidden, weight, labels, lm_head_bias=bias, chunk_size=3)
    logits = hidden @ weight.T + bias
    picked = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    expected = torch.where(labels[:, 1:] != -100, picked, torch.zeros_like(picked))
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(2, 5, generator=g)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    references = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    for grad, reference in zip(grads, references):
        torch.testing.assert_close(grad, reference)
