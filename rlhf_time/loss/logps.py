"""Log-probabilities and the memory-lean losses computed from final hidden states in chunks.

The full (tokens x vocabulary) float32 logits are never materialised at once: with a 150k vocabulary and
8k tokens they alone would be 4.9 GB. Work is done `chunk_size` positions at a time, in forward and backward;
from hidden states, only target positions are projected to the vocabulary at all.

Chunks are sized in bytes by default: `chunk_size=None` takes as many positions as fit `chunk_bytes` of float32
logits (128 MiB: 220 rows of a 151,936-row LM head, 32,768 rows of a 1,024-row one), so the loss's peak
memory is the same whatever the vocabulary. An explicit `chunk_size` (positions) still wins.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


DEFAULT_CHUNK_BYTES = 128 * 2**20  # float32 logits of one chunk; the loss step peaks at ~2-3x this (+ the head gradient)


def chunk_rows(vocab_size: int, chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Positions per chunk: `chunk_size` when given, else as many (V,) float32 logit rows as fit `chunk_bytes`."""
    if chunk_size is not None:
        return chunk_size
    return max(1, chunk_bytes // (4 * vocab_size))


def _float32(device: torch.device):
    """Under AMP autocast would run the matmuls in bf16; the logits here must be float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    logits = h.float() @ weight.T  # (C, V); weight is already float32
    return logits + bias.float() if bias is not None else logits


def _softmax_minus_onehot(log_probs: torch.Tensor, targets: torch.Tensor, onehot: float = 1.0) -> torch.Tensor:
    """softmax - onehot * one_hot(targets), (C, V), written over log_probs' storage: d(-log p(y)) / d logits."""
    grad = log_probs.exp_()  # (C, V)
    grad[torch.arange(targets.numel(), device=targets.device), targets] -= onehot
    return grad


def _blocks(shape: torch.Size, chunk_size: int):
    """(row, start, stop) of the position blocks of a (B, T-1) grid; logits of the last position are never read."""
    rows, length = shape
    for row in range(rows):
        for start in range(0, length, chunk_size):
            yield row, start, min(start + chunk_size, length)


class _TokenLogps(torch.autograd.Function):
    """log p(labels[:, t+1] | logits[:, t]) from (B, T, V) logits, one (chunk, V) float32 block at a time.

    Backward recomputes each block's softmax instead of keeping the float32 blocks alive, and writes the
    gradient straight into a (B, T, V) tensor of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_size):
        targets, mask = labels[:, 1:], labels[:, 1:] != ignore_index  # (B, T-1)
        targets = targets.masked_fill(~mask, 0)
        out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)  # (B, T-1)
        for row, start, stop in _blocks(targets.shape, chunk_size):
            if not mask[row, start:stop].any():  # e.g. a prompt: nothing to score
                continue
            block = logits[row, start:stop].float()  # (C, V)
            y = targets[row, start:stop]  # (C,)
            out[row, start:stop] = block.gather(-1, y[:, None]).squeeze(-1) - block.logsumexp(-1)
        ctx.save_for_backward(logits, targets, mask)
        ctx.chunk_size = chunk_size
        return out.masked_fill_(~mask, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # (B, T-1)
        logits, targets, mask = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # (B, T, V); the last position predicts nothing
        scale = grad_out.float() * mask
        for row, start, stop in _blocks(targets.shape, ctx.chunk_size):
            if not mask[row, start:stop].any():
                continue
            log_probs = logits[row, start:stop].float().log_softmax(-1)  # (C, V)
            grad_block = _softmax_minus_onehot(log_probs, targets[row, start:stop]).mul_(-scale[row, start:stop, None])
            grad[row, start:stop] = grad_block  # d log p(y) / d logits = onehot - softmax
        return grad, None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """log p(label_t | <t) per position, (B, T-1) float32, zeros where ignored (the PPO/GRPO log-probs).

    logits (B, T, V), labels (B, T) unshifted: logits[:, t] predicts labels[:, t+1]. At most one (chunk_size, V)
    float32 block exists at a time, in forward and in backward.
    """
    return _TokenLogps.apply(logits, labels, ignore_index, chunk_rows(logits.shape[-1], chunk_size, chunk_bytes))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                   chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Sum over each sequence of the label tokens' log-probs, (B,) float32 (the DPO log-probs)."""
    return token_logps(logits, labels, ignore_index, chunk_size=chunk_size, chunk_bytes=chunk_bytes).sum(-1)


def _targets(hidden_states: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Hidden states of the positions that predict a label, (N, H), those labels (N,), and the (B, T-1) mask."""
    shifted = labels[:, 1:]  # (B, T-1)
    mask = shifted != ignore_index
    return hidden_states[:, :-1][mask], shifted[mask], mask


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ W^T (+ b) against targets, divided by `divisor`.

    The gradient of each chunk is formed in forward, right after its loss, so only grad_hidden (N, H) and
    grad_weight (V, H) are kept for backward, which merely scales them by grad_output.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor, chunk_size, track_grad):
        with _float32(hidden.device):
            return _ChunkedCrossEntropy._forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor,
                                                 chunk_size, track_grad)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor, chunk_size, track_grad):
        needs = [track_grad and need for need in ctx.needs_input_grad[:3]]
        w = weight.float()  # (V, H)
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs[0] else None  # (N, H)
        grad_weight = torch.zeros_like(w) if needs[1] else None  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None  # (V,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        vocab = w.shape[0]
        for start in range(0, targets.numel(), chunk_size):
            h = hidden[start : start + chunk_size]  # (C, H)
            y = targets[start : start + chunk_size]  # (C,)
            log_probs = torch.log_softmax(_chunk_logits(h, w, bias), dim=-1)  # (C, V)
            nll = -log_probs.gather(-1, y[:, None]).squeeze(-1)  # (C,)
            total += ((1 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)).sum()
            if not any(needs):
                continue
            # d loss / d logits = softmax - (1 - eps) onehot - eps / V, all / divisor
            grad_logits = _softmax_minus_onehot(log_probs, y, 1 - label_smoothing)
            grad_logits.sub_(label_smoothing / vocab).div_(divisor)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        # In place: a second (V, H) float32 copy of the head's gradient would be the largest tensor of the step.
        grads = [g.mul_(grad_output).to(dtype) if g is not None else None for g, dtype in zip(ctx.grads, ctx.dtypes)]
        del ctx.grads
        return (*grads, None, None, None, None, None)


def chunked_sft_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                     lm_head_bias: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
                     ignore_index: int = -100, num_items_in_batch: Optional[int] = None,
                     chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The "sft" loss computed from final hidden states (B, T, H) and the LM head weight (V, H), chunk by chunk.

    Equal to sft_loss(hidden @ W^T + b, labels, ...) -- mean over targets, or sum / num_items_in_batch -- with
    float32 logits, while peak extra memory grows with chunk_size x V (default: ~chunk_bytes, see chunk_rows) instead
    of B x T x V (forward and backward), plus a float32 copy of W when it is bf16. Positions with ignored labels cost no compute and get zero gradient.
    """
    hidden, targets, _ = _targets(hidden_states, labels, ignore_index)  # (N, H), (N,)
    # A step without any target gives 0 (and zero gradients), not 0 / 0.
    divisor = max(float(num_items_in_batch if num_items_in_batch is not None else targets.numel()), 1.0)
    rows = chunk_rows(lm_head_weight.shape[0], chunk_size, chunk_bytes)
    return _ChunkedCrossEntropy.apply(hidden, lm_head_weight, lm_head_bias, targets, label_smoothing, divisor,
                                      rows, torch.is_grad_enabled())


class _ChunkedTargetLogps(torch.autograd.Function):
    """log p(y) of h @ W^T (+ b) per target, (N,); backward recomputes each chunk's logits (the gradient
    depends on the per-sequence grad_output, unknown in forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)  # (N,)
        with _float32(hidden.device):
            w = weight.float()
            for start in range(0, targets.numel(), chunk_size):
                logits = _chunk_logits(hidden[start : start + chunk_size], w, bias)  # (C, V)
                y = targets[start : start + chunk_size]
                out[start : start + chunk_size] = logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # (N,)
        hidden, weight, bias, targets = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with _float32(hidden.device):
            w = weight.float()
            grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if needs[0] else None  # (N, H)
            grad_weight = torch.zeros_like(w) if needs[1] else None  # (V, H)
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None
            for start in range(0, targets.numel(), ctx.chunk_size):
                stop = start + ctx.chunk_size
                h = hidden[start:stop]
                log_probs = _chunk_logits(h, w, bias).log_softmax(-1)  # (C, V)
                # d log p(y) / d logits = onehot - softmax
                grad_logits = _softmax_minus_onehot(log_probs, targets[start:stop]).mul_(-grad_out[start:stop, None])
                if grad_hidden is not None:
                    grad_hidden[start:stop] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, h.float())
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        grads = [g.to(t.dtype) if g is not None else None for g, t in zip((grad_hidden, grad_weight, grad_bias),
                                                                           (hidden, weight, bias))]
        return (*grads, None, None)


def chunked_sequence_logps(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                           lm_head_bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                           chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Per-sequence sums of label log-probs (B,) float32 from final hidden states (B, T, H) and the LM head
    (V, H): sequence_logps(hidden @ W^T + b, labels) with at most one (chunk_size, V) block alive at a time."""
    hidden, targets, mask = _targets(hidden_states, labels, ignore_index)  # (N, H), (N,), (B, T-1)
    rows = chunk_rows(lm_head_weight.shape[0], chunk_size, chunk_bytes)
    per_target = _ChunkedTargetLogps.apply(hidden, lm_head_weight, lm_head_bias, targets, rows)  # (N,)
    row_of_target = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
    return per_target.new_zeros(mask.shape[0]).index_add(0, row_of_target, per_target)


def chunked_token_logps(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                        lm_head_bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                        chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Per-position label log-probs (B, T-1) float32 (zeros where ignored) from final hidden states (B, T, H) and
    the LM head (V, H): token_logps(hidden @ W^T + b, labels), only target positions projected to the vocabulary.
    The PPO/GRPO log-probs; divide W and b by a temperature first for the log-probs of tempered sampling."""
    hidden, targets, mask = _targets(hidden_states, labels, ignore_index)  # (N, H), (N,), (B, T-1)
    rows = chunk_rows(lm_head_weight.shape[0], chunk_size, chunk_bytes)
    per_target = _ChunkedTargetLogps.apply(hidden, lm_head_weight, lm_head_bias, targets, rows)  # (N,)
    return per_target.new_zeros(mask.shape).masked_scatter(mask, per_target)


def _entropy_rows(states: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    with _float32(states.device):
        logits = _chunk_logits(states, weight.float(), bias) if weight is not None else states.float()  # (C, V)
        log_probs = logits.log_softmax(-1)
        return -(log_probs.exp() * log_probs).sum(-1)  # (C,)


def token_entropy(states: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                  lm_head_weight: Optional[torch.Tensor] = None, lm_head_bias: Optional[torch.Tensor] = None,
                  chunk_size: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Entropy of the next-token distribution, H_t = -sum_v p_v log p_v with p = softmax(z_t), at every position
    that predicts a label: (B, T-1) float32, 0 where labels[:, t+1] is ignored. Differentiable (PPO's entropy bonus).

    states: logits (B, T, V), or final hidden states (B, T, H) with the LM head `lm_head_weight` (V, H) (+ bias), so
    z_t = h_t W^T + b. Each chunk's float32 logits are recomputed in backward (activation checkpointing): at most one
    (chunk, V) block exists at a time.
    """
    from torch.utils.checkpoint import checkpoint

    mask = labels[:, 1:] != ignore_index  # (B, T-1)
    rows = states[:, :-1][mask]  # (N, H or V)
    vocab = lm_head_weight.shape[0] if lm_head_weight is not None else states.shape[-1]
    step = chunk_rows(vocab, chunk_size, chunk_bytes)
    pieces = [checkpoint(_entropy_rows, rows[start : start + step], lm_head_weight, lm_head_bias, use_reentrant=False)
              for start in range(0, rows.shape[0], step)]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=states.device)
    return out.masked_scatter(mask, torch.cat(pieces)) if pieces else out


def label_cross_entropy_and_hits(states: torch.Tensor, labels: torch.Tensor, lm_head: Optional[nn.Module] = None, *,
                                 ignore_index: int = -100, chunk_size: Optional[int] = None,
                                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Evaluation sums over target positions t (labels shifted), a chunk of positions at a time, no gradient:

        loss_sum = sum_t -log softmax(z_t)[y_t]    correct = #{t : argmax z_t = y_t}    tokens = #targets

    states: final hidden states (B, T, H) with `lm_head`, or logits (B, T, V) without one; z_t in float32.
    """
    shifted = labels[:, 1:]  # (B, T-1)
    targets = shifted != ignore_index
    rows_of_states, wanted = states[:, :-1][targets], shifted[targets]  # (N, H or V), (N,)
    vocab = lm_head.out_features if lm_head is not None else states.shape[-1]
    rows = chunk_rows(vocab, chunk_size, chunk_bytes)
    loss_sum = torch.zeros((), device=states.device)
    correct = torch.zeros((), device=states.device)
    for start in range(0, wanted.numel(), rows):
        chunk = rows_of_states[start : start + rows]
        logits = (lm_head(chunk) if lm_head is not None else chunk).float()  # (chunk, V)
        answer = wanted[start : start + rows]
        loss_sum += F.cross_entropy(logits, answer, reduction="sum")
        correct += (logits.argmax(dim=-1) == answer).sum()
    return {"loss_sum": loss_sum, "correct": correct, "tokens": targets.sum().float()}
