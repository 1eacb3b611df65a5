"""Each loss against hand arithmetic, torch.nn.functional, a real model's own loss, and its defining properties."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

import rlhf_time.loss
from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import (LossConfigError, chunked_sequence_logps, chunked_sft_loss, create_loss,
                            dpo_implicit_rewards, dpo_loss, masked_mean, sequence_logps)

torch.manual_seed(0)


@pytest.fixture(scope="module")
def qwen3():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()


def _masked_labels(ids):
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[2, 7:] = -100  # right padding
    return labels


def test_sft_equals_model_loss_and_torch_cross_entropy(qwen3):
    ids = torch.randint(0, 128, (3, 9))
    labels = _masked_labels(ids)
    out = qwen3(ids, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(create_loss("sft")(out.logits, labels), out.loss)
    smooth = create_loss("sft", label_smoothing=0.1)(out.logits, labels)
    reference = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(smooth, reference)
    # The memory-lean path from the final (normed) hidden states and the LM head gives the model's own loss.
    chunked = chunked_sft_loss(out.hidden_states[-1], qwen3.lm_head.weight, labels, chunk_size=5)
    torch.testing.assert_close(chunked, out.loss)


def test_sequence_logps_equal_minus_the_models_summed_cross_entropy(qwen3):
    ids = torch.randint(0, 128, (3, 9))
    labels = _masked_labels(ids)
    out = qwen3(ids, output_hidden_states=True)
    per_token = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (B, T-1)
    torch.testing.assert_close(sequence_logps(out.logits, labels, chunk_size=3), -per_token.sum(-1))
    chunked = chunked_sequence_logps(out.hidden_states[-1], qwen3.lm_head.weight, labels, chunk_size=4)
    torch.testing.assert_close(chunked, -per_token.sum(-1))


def test_sft_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])  # p = (3/4, 1/4) at position 1
    labels = torch.tensor([[-100, -100, 0]])
    assert create_loss("sft")(logits, labels).item() == pytest.approx(-math.log(0.75))
    assert create_loss("sft", reduction="sum")(logits, labels).item() == pytest.approx(-math.log(0.75))
    per_token = create_loss("sft", reduction="none")(logits, labels)
    assert per_token.shape == (1, 2) and per_token[0, 0] == 0
    # smoothing 0.2 over V=2: -(0.8) log(3/4) - 0.2/2 (log(3/4) + log(1/4))
    smoothed = -0.8 * math.log(0.75) - 0.1 * (math.log(0.75) + math.log(0.25))
    assert create_loss("sft", label_smoothing=0.2)(logits, labels).item() == pytest.approx(smoothed)
    assert create_loss("sft")(logits, labels, num_items_in_batch=4).item() == pytest.approx(-math.log(0.75) / 4)


def test_sft_with_num_items_summed_over_micro_batches_equals_full_batch():
    logits = torch.randn(6, 7, 11)
    labels = torch.randint(0, 11, (6, 7))
    labels[torch.rand(6, 7) < 0.4] = -100
    loss_fn = create_loss("sft", label_smoothing=0.1)
    items = int((labels[:, 1:] != -100).sum())
    parts = sum(loss_fn(logits[i : i + 2], labels[i : i + 2], num_items_in_batch=items) for i in (0, 2, 4))
    torch.testing.assert_close(parts, loss_fn(logits, labels))


def test_pairwise_hand_computed_and_margins():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert create_loss("pairwise")(chosen, rejected).item() == pytest.approx(expected)
    with_margin = create_loss("pairwise", margin=1.0)(chosen, rejected)
    assert with_margin.item() == pytest.approx((math.log(2) + math.log(1 + math.e)) / 2)
    # per-example margins override the default; NaN (a pair without one) falls back to it
    per_pair = create_loss("pairwise", reduction="none")(chosen, rejected, margin=torch.tensor([float("nan"), -1.0]))
    assert per_pair.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(-1))])


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.randn(5)
    loss = create_loss("dpo", beta=0.3)(logps, logps - 1, logps, logps - 1)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_hand_computed():
    # z = (-1 - -1.5) - (-2 - -1.5) = 1
    args = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    assert create_loss("dpo", beta=1.0)(*args).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert create_loss("dpo", beta=0.5, loss_type="hinge")(*args).item() == pytest.approx(0.5)
    assert create_loss("dpo", beta=0.25, loss_type="ipo")(*args).item() == pytest.approx((1 - 2) ** 2)
    eps = 0.1
    conservative = (1 - eps) * math.log(1 + math.exp(-1)) + eps * math.log(1 + math.exp(1))
    assert create_loss("dpo", beta=1.0, label_smoothing=eps)(*args).item() == pytest.approx(conservative)


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
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, reduction="none", **options), expected)


def test_dpo_implicit_rewards_are_detached():
    pc, pr = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    rc, rr = torch.randn(3), torch.randn(3)
    chosen, rejected = dpo_implicit_rewards(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(chosen, 0.2 * (pc.detach() - rc))
    torch.testing.assert_close(rejected, 0.2 * (pr.detach() - rr))
    assert not chosen.requires_grad and not rejected.requires_grad


def test_policy_loss_formula_and_clipped_gradients():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = create_loss("policy", clip_eps=0.2)(logps, old, advantages, mask)
    # token 0: ratio 1.5 clipped to 1.2 (A>0) -> -1.2; token 1: ratio 0.5 clipped to 0.8 (A<0) -> 0.8; token 2: -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == 0  # clipped in the advantage's direction
    assert logps.grad[0, 2].item() == pytest.approx(-2.0 * 1.1 / 3)  # d(-A rho)/d logp = -A rho
    assert logps.grad[0, 3] == 0  # masked
    assert advantages.grad is None  # rollout constants get no gradient


def test_policy_loss_is_not_clipped_against_the_advantage():
    # ratio 1.5 with A < 0: the unclipped term -A * 1.5 is the larger, so the gradient flows (pessimistic bound)
    logps = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss = create_loss("policy", clip_eps=0.2)(logps, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert logps.grad.item() == pytest.approx(1.5)


def test_value_loss_formula_and_unclipped_case():
    values, old, returns = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.4]]), torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    # token 0: unclipped (1-0)^2=1, clipped V=0.2 -> 0.04 -> max 1; token 1: |V-V_old|<=eps -> (0.5-1)^2
    assert create_loss("value", clip_eps=0.2)(values, old, returns, mask).item() == pytest.approx(0.5 * (1 + 0.25) / 2)
    old, returns = torch.randn(4, 5), torch.randn(4, 5)
    near = old + 0.2 * (2 * torch.rand(4, 5) - 1)  # |V - V_old| <= eps everywhere
    mask = (torch.rand(4, 5) > 0.3).float()
    unclipped = 0.5 * (((near - returns) ** 2) * mask).sum() / mask.sum()
    torch.testing.assert_close(create_loss("value", clip_eps=0.2)(near, old, returns, mask), unclipped)


def test_kd_hand_computed():
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # p_S = (1/2, 1/2)
    teacher = torch.tensor([[[math.log(3.0), 0.0], [5.0, 5.0]]])  # p_T = (3/4, 1/4)
    labels = torch.tensor([[-100, 1]])
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert create_loss("kd")(student, teacher, labels).item() == pytest.approx(forward)
    assert create_loss("kd", kind="reverse_kl")(student, teacher, labels).item() == pytest.approx(reverse)
    # tau = 2: p = softmax(logits / 2) -> p_T = (sqrt3, 1) / (sqrt3 + 1), times tau^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    tempered = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert create_loss("kd", temperature=2.0)(student, teacher, labels).item() == pytest.approx(tempered)


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
    p_s, p_t = F.softmax(s * tau, -1), F.softmax(t * tau, -1)
    m = 0.3 * p_t + 0.7 * p_s
    by_hand = 0.3 * F.kl_div(m.log(), p_t, reduction="batchmean") + 0.7 * F.kl_div(m.log(), p_s, reduction="batchmean")
    torch.testing.assert_close(create_loss("kd", kind="jsd", beta=0.3)(student, teacher, labels), by_hand)
    # The formula is identically 0 at the endpoints; they are forward / reverse KL instead (TRL's GKD convention).
    torch.testing.assert_close(create_loss("kd", kind="jsd", beta=0.0, temperature=tau)(student, teacher, labels), forward)
    torch.testing.assert_close(create_loss("kd", kind="jsd", beta=1.0, temperature=tau)(student, teacher, labels), reverse)


def test_masked_mean():
    values, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]]), torch.tensor([[1, 0, 1], [1, 0, 0]])
    # (1 + 3 + 4) / 3: the NaN is masked out, not multiplied by 0
    assert masked_mean(values, mask).item() == pytest.approx(8 / 3)
    assert masked_mean(values, mask, dim=1).tolist() == [2.0, 4.0]
    assert masked_mean(values, torch.zeros(2, 3), dim=1).tolist() == [0.0, 0.0]


def _cases(dtype=torch.float32):
    """name -> (options, inputs in `dtype`, where items count or None, per-item reference written out here).

    The references are computed in float32 from the same (for bf16: rounded) numbers the loss receives.
    """
    g = torch.Generator().manual_seed(3)
    rounded = lambda *xs: tuple(x.to(dtype).float() for x in xs)  # noqa: E731
    logits, teacher = rounded(torch.randn(3, 6, 7, generator=g), torch.randn(3, 6, 7, generator=g))
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, :3] = -100
    counted = labels[:, 1:] != -100
    chosen, rejected = rounded(*torch.randn(2, 4, generator=g) * 3)  # (B,) each
    pc, pr, rc, rr = rounded(*torch.randn(4, 4, generator=g))
    logps, old, advantages = rounded(*torch.randn(3, 3, 5, generator=g) * 0.3)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    ratio = (logps - old).exp()
    z = (pc - rc) - (pr - rr)
    log_s, log_t = F.log_softmax(logits[:, :-1] / 2, -1), F.log_softmax(teacher[:, :-1] / 2, -1)
    cast = lambda *xs: tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)  # noqa: E731
    return {
        "sft": ({"label_smoothing": 0.1}, cast(logits, labels), counted,
                F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], label_smoothing=0.1, reduction="none")),
        "pairwise": ({"margin": 0.5}, cast(chosen, rejected), None, -torch.log(torch.sigmoid(chosen - rejected - 0.5))),
        "dpo": ({"beta": 0.5}, cast(pc, pr, rc, rr), None, -torch.log(torch.sigmoid(0.5 * z))),
        "policy": ({"clip_eps": 0.1}, cast(logps, old, advantages, mask), mask,
                   torch.max(-advantages * ratio, -advantages * ratio.clamp(0.9, 1.1))),
        "value": ({"clip_eps": 0.1}, cast(logps, old, advantages, mask), mask,
                  0.5 * torch.max((logps - advantages) ** 2,
                                  (torch.clamp(logps, old - 0.1, old + 0.1) - advantages) ** 2)),
        "kd": ({"temperature": 2.0}, cast(logits, teacher, labels), counted,
               4 * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)),
    }


LOSS_NAMES = ["sft", "pairwise", "dpo", "policy", "value", "kd"]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reductions_none_sum_mean_agree_with_the_reference(name):
    options, args, counted, per_item = _cases()[name]
    counted = torch.ones_like(per_item, dtype=torch.bool) if counted is None else counted.bool()
    none = create_loss(name, reduction="none", **options)(*args)
    assert none.shape == per_item.shape
    torch.testing.assert_close(none, torch.where(counted, per_item, 0.0))
    total = create_loss(name, reduction="sum", **options)(*args)
    torch.testing.assert_close(total, per_item[counted].sum())
    torch.testing.assert_close(create_loss(name, **options)(*args), per_item[counted].mean())
    torch.testing.assert_close(total, none.sum())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_inputs_give_float32_results(name):
    options, args, counted, per_item = _cases(torch.bfloat16)[name]
    assert any(a.dtype == torch.bfloat16 for a in args)
    result = create_loss(name, **options)(*args)
    assert result.dtype == torch.float32
    counted = torch.ones_like(per_item, dtype=torch.bool) if counted is None else counted.bool()
    torch.testing.assert_close(result, per_item[counted].mean())


def test_unknown_names_hyperparameters_and_choices_list_the_valid_ones():
    with pytest.raises(LossConfigError, match="valid: sft, pairwise, dpo, policy, value, kd"):
        create_loss("ppo")
    with pytest.raises(LossConfigError, match="valid: label_smoothing, ignore_index, reduction"):
        create_loss("sft", smoothing=0.1)
    with pytest.raises(LossConfigError, match="valid: margin, reduction"):
        create_loss("pairwise", margn=1)
    with pytest.raises(LossConfigError, match="valid: sigmoid, hinge, ipo"):
        create_loss("dpo", loss_type="kto")  # at creation, not at the first call
    with pytest.raises(LossConfigError, match="valid: forward_kl, reverse_kl, jsd"):
        create_loss("kd", kind="tvd")
    with pytest.raises(LossConfigError, match="valid: mean, sum, none"):
        create_loss("value", reduction="avg")
    with pytest.raises(LossConfigError, match="valid: mean, sum, none"):  # the pure function checks too
        dpo_loss(*torch.zeros(4, 2), reduction="avg")
    with pytest.raises(RlhfTimeError):
        create_loss("ppo")
    with pytest.raises(ValueError):
        create_loss("sft", beta=1.0)


LOSS_DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_the_loss_reference_examples_run_and_name_every_export():
    text = LOSS_DOCS.read_text(encoding="utf-8")
    assert text.startswith("# Loss reference")
    examples = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(examples) >= 7
    for code in examples[1:]:  # the first is the signature sketch
        exec(compile(code, str(LOSS_DOCS), "exec"), {})
    assert [name for name in rlhf_time.loss.__all__ if f"`{name}" not in text and name != "LOSSES"] == []
