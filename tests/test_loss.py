"""Each loss against hand arithmetic, torch.nn.functional, a real model's own loss, and its defining properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from rlhf_time.loss import (LossConfigError, chunked_sequence_logps, chunked_sft_loss, create_loss, dpo_implicit_rewards,
                            masked_mean, sequence_logps, token_logps)

torch.manual_seed(0)


def test_sft_equals_model_loss_and_torch_cross_entropy():
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    ids = torch.randint(0, 128, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 7:] = -100
    out = model(ids, labels=labels)
    torch.testing.assert_close(create_loss("sft")(out.logits, labels), out.loss)
    smooth = create_loss("sft", label_smoothing=0.1)(out.logits, labels)
    reference = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(smooth, reference)


def test_sft_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])  # p(0)=3/4 at position 1
    labels = torch.tensor([[-100, -100, 0]])
    assert create_loss("sft")(logits, labels).item() == pytest.approx(-math.log(0.75))
    assert create_loss("sft", reduction="sum")(logits, labels).item() == pytest.approx(-math.log(0.75))
    per_token = create_loss("sft", reduction="none")(logits, labels)
    assert per_token.shape == (1, 2) and per_token[0, 0] == 0


def test_sft_with_num_items_summed_over_micro_batches_equals_full_batch():
    logits = torch.randn(6, 7, 11)
    labels = torch.randint(0, 11, (6, 7))
    labels[torch.rand(6, 7) < 0.4] = -100
    loss_fn = create_loss("sft")
    items = int((labels[:, 1:] != -100).sum())
    parts = sum(loss_fn(logits[i : i + 2], labels[i : i + 2], num_items_in_batch=items) for i in (0, 2, 4))
    torch.testing.assert_close(parts, loss_fn(logits, labels))


def test_bf16_inputs_give_float32_results():
    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    result = create_loss("sft")(logits.bfloat16(), labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, create_loss("sft")(logits.bfloat16().float(), labels))
    chosen, rejected = torch.randn(4).bfloat16(), torch.randn(4).bfloat16()
    assert create_loss("pairwise")(chosen, rejected).dtype == torch.float32


def test_pairwise_hand_computed_and_margins():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(0.5)) / 2
    assert create_loss("pairwise")(chosen, rejected).item() == pytest.approx(expected)
    with_margin = create_loss("pairwise", margin=1.0)(chosen, rejected)
    assert with_margin.item() == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2)
    per_pair = create_loss("pairwise", reduction="none")(chosen, rejected, margin=torch.tensor([float("nan"), -1.0]))
    assert per_pair.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-1))), math.log(1 + math.exp(-1))])


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.randn(5)
    loss = create_loss("dpo", beta=0.3)(logps, logps - 1, logps, logps - 1)
    assert loss.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_variants_against_formula(loss_type):
    pc, pr, rc, rr = torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4)
    beta, eps = 0.2, 0.1
    z = (pc - rc) - (pr - rr)
    expected = {
        "sigmoid": -(1 - eps) * torch.log(torch.sigmoid(beta * z)) - eps * torch.log(torch.sigmoid(-beta * z)),
        "hinge": torch.clamp(1 - beta * z, min=0),
        "ipo": (z - 1 / (2 * beta)) ** 2,
    }[loss_type]
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=eps if loss_type == "sigmoid" else 0.0)
    torch.testing.assert_close(create_loss("dpo", **options)(pc, pr, rc, rr), expected.mean())
    torch.testing.assert_close(create_loss("dpo", reduction="none", **options)(pc, pr, rc, rr), expected)
    chosen_reward, rejected_reward = dpo_implicit_rewards(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(chosen_reward, beta * (pc - rc))
    torch.testing.assert_close(rejected_reward, beta * (pr - rr))


def test_policy_loss_formula_and_clipped_gradients():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = create_loss("policy", clip_eps=0.2)(logps, old, advantages, mask)
    # token 0: ratio 1.5 clipped to 1.2 (A>0) -> -1.2; token 1: ratio 0.5 clipped to 0.8 (A<0) -> 0.8; token 2: -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == 0  # clipped in the advantage's direction
    assert logps.grad[0, 2] == pytest.approx(-2.0 * 1.1 / 3)
    assert logps.grad[0, 3] == 0  # masked


def test_value_loss_formula_and_unclipped_case():
    values, old, returns = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.4]]), torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped (1-0)^2=1, clipped V=0.2 -> 0.04 -> max 1; token 1: |V-V_old|<=eps -> (0.5-1)^2
    assert create_loss("value", clip_eps=0.2)(values, old, returns, mask).item() == pytest.approx(0.5 * (1 + 0.25) / 2)
    near = old + 0.1 * torch.randn(1, 2).clamp(-1, 1)
    unclipped = 0.5 * ((near - returns) ** 2).mean()
    torch.testing.assert_close(create_loss("value", clip_eps=0.2)(near, old, returns, mask), unclipped)


def test_kd_against_kl_div_and_properties():
    student, teacher = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[0, :3] = -100
    tau = 2.0
    counted = labels[:, 1:] != -100
    s, t = student[:, :-1][counted] / tau, teacher[:, :-1][counted] / tau
    forward = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * tau**2
    reverse = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="batchmean") * tau**2
    torch.testing.assert_close(create_loss("kd", temperature=tau)(student, teacher, labels), forward)
    torch.testing.assert_close(create_loss("kd", temperature=tau, kind="reverse_kl")(student, teacher, labels), reverse)
    assert create_loss("kd")(student, student, labels).abs().item() < 1e-6
    jsd = create_loss("kd", kind="jsd", beta=0.5)
    torch.testing.assert_close(jsd(student, teacher, labels), jsd(teacher, student, labels))
    m = 0.5 * (F.softmax(s * tau, -1) + F.softmax(t * tau, -1))
    by_hand = 0.5 * F.kl_div(m.log(), F.softmax(t * tau, -1), reduction="batchmean") + 0.5 * F.kl_div(
        m.log(), F.softmax(s * tau, -1), reduction="batchmean")
    torch.testing.assert_close(jsd(student, teacher, labels), by_hand)


def test_masked_mean_and_reductions_agree():
    values, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 0, 1]])
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, dim=1).tolist() == [2.0]
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    none = create_loss("sft", reduction="none")(logits, labels)
    assert create_loss("sft", reduction="sum")(logits, labels).item() == pytest.approx(none.sum().item(), rel=1e-6)
    assert create_loss("sft")(logits, labels).item() == pytest.approx(none.sum().item() / 8, rel=1e-6)


def test_unknown_names_and_hyperparameters_list_valid_ones():
    with pytest.raises(LossConfigError, match="valid: sft, pairwise, dpo, policy, value, kd"):
        create_loss("ppo")
    with pytest.raises(LossConfigError, match="label_smoothing"):
        create_loss("sft", smoothing=0.1)
    with pytest.raises(LossConfigError, match="margin"):
        create_loss("pairwise", margn=1)
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        create_loss("dpo", loss_type="kto")(*torch.zeros(4, 2))


def test_sequence_and_token_logps_against_log_softmax():
    logits, labels = torch.randn(3, 6, 10), torch.randint(0, 10, (3, 6))
    labels[1, :4] = -100
    gathered = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    expected = gathered * (labels[:, 1:] != -100)
    torch.testing.assert_close(token_logps(logits, labels), expected)
    torch.testing.assert_close(sequence_logps(logits, labels), expected.sum(-1))


@pytest.mark.parametrize("smoothing, num_items, chunk", [(0.0, None, 3), (0.1, None, 5), (0.0, 50, 7), (0.2, 13, 1000)])
def test_chunked_sft_loss_and_gradients_equal_the_plain_loss(smoothing, num_items, chunk):
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(21, 16, requires_grad=True)
    bias = torch.randn(21, requires_grad=True)
    labels = torch.randint(0, 21, (3, 8))
    labels[0, :5] = -100
    got = chunked_sft_loss(hidden, weight, labels, lm_head_bias=bias, label_smoothing=smoothing,
                           num_items_in_batch=num_items, chunk_size=chunk)
    logits = hidden @ weight.T + bias
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 21), labels[:, 1:].reshape(-1), label_smoothing=smoothing,
                                reduction="sum")
    expected = per_token / (num_items or int((labels[:, 1:] != -100).sum()))
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(a, b)


def test_chunked_loss_with_frozen_head_and_bf16_hidden():
    hidden = torch.randn(2, 6, 8).bfloat16().requires_grad_()
    weight = torch.randn(11, 8)  # frozen (e.g. LoRA)
    labels = torch.randint(0, 11, (2, 6))
    loss = chunked_sft_loss(hidden, weight, labels, chunk_size=4)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.bfloat16
    reference = F.cross_entropy((hidden.float() @ weight.T)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, reference)


def test_chunked_sequence_logps_and_gradients():
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.randint(0, 13, (2, 7))
    labels[0, :3] = -100
    got = chunked_sequence_logps(hidden, weight, labels, chunk_size=3)
    logits = hidden @ weight.T
    gathered = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    expected = (gathered * (labels[:, 1:] != -100)).sum(-1)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got.sum(), (hidden, weight)), torch.autograd.grad(expected.sum(), (hidden, weight))):
        torch.testing.assert_close(a, b)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_chunked_loss_memory_grows_with_the_chunk_not_the_vocabulary_times_tokens():
    vocab, tokens, chunk = 150_000, 1024, 64
    hidden = torch.randn(1, tokens, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    with _LargestTensor() as recorder:
        chunked_sft_loss(hidden, weight, labels, chunk_size=chunk).backward()
    assert recorder.largest <= chunk * vocab  # never the (tokens x vocab) logits
    assert recorder.largest < tokens * vocab / 8
