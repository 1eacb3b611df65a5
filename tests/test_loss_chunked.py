"""Log-prob helpers and the chunked-from-hidden-states losses: same numbers and gradients as full logits, and a
bound on the largest tensor they ever create (no timing)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_time.loss import chunked_sequence_logps, chunked_sft_loss, create_loss, sequence_logps, token_logps

torch.manual_seed(0)


def _reference_token_logps(logits, labels):
    """log_softmax over the full logits, gathered at the next-token labels; 0 where ignored. (B, T-1)"""
    targets = labels[:, 1:]
    gathered = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return gathered * (targets != -100)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_and_sequence_logps_and_their_gradients(chunk):
    logits = torch.randn(3, 6, 10, requires_grad=True)
    labels = torch.randint(0, 10, (3, 6))
    labels[1, :4] = -100
    labels[2, 5] = -100
    expected = _reference_token_logps(logits, labels)
    got = token_logps(logits, labels, chunk_size=chunk)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sequence_logps(logits, labels, chunk_size=chunk), expected.sum(-1))
    weights = torch.randn(3, 5)  # an arbitrary upstream gradient
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (reference,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, reference)
    assert grad[:, -1].abs().sum() == 0 and grad[1, :3].abs().sum() == 0  # nothing predicted / ignored


def test_token_logps_of_bf16_logits_are_float32():
    logits = torch.randn(2, 5, 11).bfloat16().requires_grad_()
    labels = torch.randint(0, 11, (2, 5))
    got = token_logps(logits, labels, chunk_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _reference_token_logps(logits.detach().float(), labels))
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def _plain_sft(hidden, weight, bias, labels, smoothing, num_items):
    logits = hidden.float() @ weight.float().T + (bias.float() if bias is not None else 0)  # (B, T, V) at once
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1),
                             label_smoothing=smoothing, reduction="sum")
    return summed / (num_items or int((labels[:, 1:] != -100).sum()))


# N = 3 * 7 - 5 = 16 target positions; chunks of 3, 5 and 7 do not divide it.
@pytest.mark.parametrize("smoothing, num_items, chunk, with_bias", [
    (0.0, None, 3, True), (0.1, None, 5, False), (0.0, 50, 7, True), (0.2, 13, 1000, True), (0.1, 40, 16, False)])
def test_chunked_sft_loss_and_gradients_equal_the_plain_loss(smoothing, num_items, chunk, with_bias):
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(21, 16, requires_grad=True)
    bias = torch.randn(21, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 21, (3, 8))
    labels[0, :5] = -100
    got = chunked_sft_loss(hidden, weight, labels, lm_head_bias=bias, label_smoothing=smoothing,
                           num_items_in_batch=num_items, chunk_size=chunk)
    expected = _plain_sft(hidden, weight, bias, labels, smoothing, num_items)
    torch.testing.assert_close(got, expected)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    for a, b in zip(torch.autograd.grad(3 * got, inputs), torch.autograd.grad(3 * expected, inputs)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # evaluation: no gradient work, same number
        torch.testing.assert_close(chunked_sft_loss(hidden, weight, labels, lm_head_bias=bias,
                                                    label_smoothing=smoothing, num_items_in_batch=num_items,
                                                    chunk_size=chunk), expected.detach())


def test_chunked_sft_loss_summed_over_micro_batches_equals_the_full_batch():
    hidden, weight = torch.randn(4, 6, 8), torch.randn(13, 8)
    labels = torch.randint(0, 13, (4, 6))
    labels[torch.rand(4, 6) < 0.3] = -100
    items = int((labels[:, 1:] != -100).sum())
    parts = sum(chunked_sft_loss(hidden[i : i + 2], weight, labels[i : i + 2], num_items_in_batch=items, chunk_size=4)
                for i in (0, 2))
    torch.testing.assert_close(parts, _plain_sft(hidden, weight, None, labels, 0.0, None))


def test_chunked_losses_with_bf16_hidden_and_weights_are_float32():
    hidden = torch.randn(2, 6, 8).bfloat16().requires_grad_()
    weight = torch.randn(11, 8).bfloat16().requires_grad_()
    labels = torch.randint(0, 11, (2, 6))
    loss = chunked_sft_loss(hidden, weight, labels, label_smoothing=0.1, chunk_size=4)
    assert loss.dtype == torch.float32
    up_hidden, up_weight = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    reference = _plain_sft(up_hidden, up_weight, None, labels, 0.1, None)
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    for a, b in zip(grads, torch.autograd.grad(reference, (up_hidden, up_weight))):
        torch.testing.assert_close(a.float(), b, atol=1e-2, rtol=1e-2)  # bf16 rounding of the gradient
    logps = chunked_sequence_logps(hidden, weight, labels, chunk_size=4)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, _reference_token_logps(up_hidden.detach() @ up_weight.detach().T, labels).sum(-1))


def test_chunked_loss_with_frozen_head():
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen (e.g. LoRA): no (V, H) gradient is formed
    labels = torch.randint(0, 11, (2, 6))
    loss = chunked_sft_loss(hidden, weight, labels, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    reference_hidden = hidden.detach().requires_grad_()
    (reference,) = torch.autograd.grad(_plain_sft(reference_hidden, weight, None, labels, 0.0, None), reference_hidden)
    torch.testing.assert_close(grad, reference)


@pytest.mark.parametrize("num_items", [None, 0, 7])
def test_no_targets_give_zero_loss_and_zero_gradients(num_items):
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # the first label is never a target: nothing predicts it
    loss = chunked_sft_loss(hidden, weight, labels, lm_head_bias=bias, num_items_in_batch=num_items, chunk_size=4)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, (hidden, weight, bias)):
        assert torch.equal(grad, torch.zeros_like(grad))
    logits = torch.randn(2, 5, 11)
    assert create_loss("sft")(logits, labels, num_items_in_batch=num_items).item() == 0.0
    logps = chunked_sequence_logps(hidden, weight, labels, lm_head_bias=bias)
    assert logps.tolist() == [0.0, 0.0]
    for grad in torch.autograd.grad(logps.sum(), (hidden, weight, bias), allow_unused=True):
        assert grad is None or torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("chunk, with_bias", [(3, False), (5, True), (100, True)])
def test_chunked_sequence_logps_and_gradients(chunk, with_bias):
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    bias = torch.randn(13, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 13, (2, 7))
    labels[0, :3] = -100
    got = chunked_sequence_logps(hidden, weight, labels, lm_head_bias=bias, chunk_size=chunk)
    logits = hidden @ weight.T + (bias if with_bias else 0)
    expected = _reference_token_logps(logits, labels).sum(-1)
    torch.testing.assert_close(got, expected)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    upstream = torch.tensor([0.7, -1.3])  # e.g. DPO's per-pair gradient
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), inputs),
                    torch.autograd.grad((expected * upstream).sum(), inputs)):
        torch.testing.assert_close(a, b)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any (float32, unless `dtype` is None) tensor an op produces."""

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype, self.largest = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and self.dtype in (None, value.dtype):
                self.largest = max(self.largest, value.numel())
        return out


def test_chunked_sft_memory_grows_with_the_chunk_not_tokens_times_vocabulary():
    vocab, tokens, chunk = 8_000, 512, 64
    hidden = torch.randn(1, tokens, 32, requires_grad=True)
    weight = torch.randn(vocab, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    with _LargestTensor() as forward:
        loss = chunked_sft_loss(hidden, weight, labels, chunk_size=chunk)
    with _LargestTensor() as backward:
        loss.backward()
    assert forward.largest == chunk * vocab < tokens * vocab  # one block of logits, never all of them
    assert backward.largest == vocab * 32  # backward only scales the stored grad_weight (V, H)
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_chunked_sequence_logps_memory_grows_with_the_chunk():
    vocab, tokens, chunk = 8_000, 256, 32
    hidden = torch.randn(2, tokens // 2, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens // 2))
    with _LargestTensor() as forward:
        logps = chunked_sequence_logps(hidden, weight, labels, chunk_size=chunk)
    with _LargestTensor() as backward:
        logps.sum().backward()
    assert forward.largest == backward.largest == chunk * vocab < tokens * vocab  # recomputed block by block


def test_token_logps_never_hold_float32_logits_of_the_whole_batch():
    vocab, tokens, chunk = 4_000, 128, 16
    logits = torch.randn(2, tokens, vocab).bfloat16().requires_grad_()  # as a bf16 model returns them
    labels = torch.randint(0, vocab, (2, tokens))
    with _LargestTensor(torch.float32) as recorder:
        token_logps(logits, labels, chunk_size=chunk).sum().backward()
    # float32 only per block; the bf16 gradient is the logits' own size
    assert recorder.largest == chunk * vocab < tokens * vocab
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("budget", [dict(), dict(chunk_bytes=4 * 11 * 3), dict(chunk_size=2)])
def test_eval_sums_equal_full_logits_cross_entropy_and_argmax_whatever_the_chunk(budget):
    """label_cross_entropy_and_hits (the SFT/KD evaluation) against F.cross_entropy and argmax on full logits; the byte
    budget is taken by the function itself (3 rows of an 11-word vocabulary here), as an explicit chunk_size is."""
    from rlhf_time.loss import label_cross_entropy_and_hits

    torch.manual_seed(0)
    hidden, head = torch.randn(2, 7, 5), torch.nn.Linear(5, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100  # a prompt: not a target
    got = label_cross_entropy_and_hits(hidden, labels, head, **budget)
    logits, targets = head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    keep = targets != -100
    torch.testing.assert_close(got["loss_sum"], F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
    assert got["correct"].item() == (logits[keep].argmax(-1) == targets[keep]).sum().item()
    assert got["tokens"].item() == keep.sum().item() == 10
    from_logits = label_cross_entropy_and_hits(head(hidden).detach(), labels, None, **budget)
    torch.testing.assert_close(from_logits["loss_sum"], got["loss_sum"])


def test_chunked_token_logps_and_kd_take_the_byte_budget_themselves():
    """A budget of 2 logit rows gives the same numbers as one chunk: the stages pass loss_chunk_bytes through and
    never convert it to rows."""
    from rlhf_time.loss import chunked_token_logps
    from rlhf_time.loss.distill import chunked_kd_loss

    torch.manual_seed(1)
    hidden, weight, labels = torch.randn(2, 6, 4), torch.randn(9, 4), torch.randint(0, 9, (2, 6))
    whole = chunked_token_logps(hidden, weight, labels, chunk_size=64)
    torch.testing.assert_close(chunked_token_logps(hidden, weight, labels, chunk_bytes=2 * 4 * 9), whole)
    torch.testing.assert_close(whole, token_logps(hidden @ weight.T, labels))
    teacher = torch.randn(2, 6, 9)
    one = chunked_kd_loss(hidden @ weight.T, teacher, labels, alpha=0.3, chunk_size=64)
    small = chunked_kd_loss(hidden @ weight.T, teacher, labels, alpha=0.3, chunk_bytes=2 * 4 * 9)
    torch.testing.assert_close(small[0], one[0])
    assert {k: v.item() for k, v in small[1].items()} == pytest.approx({k: v.item() for k, v in one[1].items()})
