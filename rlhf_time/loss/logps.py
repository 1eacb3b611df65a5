"""Log-probabilities and the memory-lean losses computed from final hidden states in chunks.

The full (tokens x vocabulary) float32 logits are never materialised at once: with a 150k vocabulary and
8k tokens they alone would be 4.9 GB. Only target positions are projected, `chunk_size` rows at a time.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log p(label_t | <t) per position, (B, T-1), zeros where ignored; one row of logits in float32 at a time."""
    rows = []
    for row_logits, row_labels in zip(logits[:, :-1], labels[:, 1:]):  # (T-1, V), (T-1,)
        mask = row_labels != ignore_index
        targets = row_labels.masked_fill(~mask, 0)
        row = row_logits.float()
        picked = row.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(row, dim=-1)
        rows.append(picked * mask)
    return torch.stack(rows)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over each sequence of the label tokens' log-probs, (B,)."""
    return token_logps(logits, labels, ignore_index).sum(-1)


def _targets(hidden_states: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Hidden states of the positions that predict a label, (N, H), with those labels (N,)."""
    shifted = labels[:, 1:]  # (B, T-1)
    mask = shifted != ignore_index
    return hidden_states[:, :-1][mask], shifted[mask], mask


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of h @ W^T (+ b) against targets; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor, chunk_size):
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # float32 logits, even under AMP
            return _ChunkedCrossEntropy._forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, label_smoothing, divisor, chunk_size):
        needs = ctx.needs_input_grad
        w = weight.float()
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs[0] else None
        grad_weight = torch.zeros_like(w) if needs[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        vocab = w.shape[0]
        for start in range(0, targets.numel(), chunk_size):
            h = hidden[start : start + chunk_size].float()  # (C, H)
            y = targets[start : start + chunk_size]  # (C,)
            logits = h @ w.T  # (C, V)
            if bias is not None:
                logits = logits + bias.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            nll = -log_probs.gather(-1, y[:, None]).squeeze(-1)
            smooth = -log_probs.mean(-1)
            total += ((1 - label_smoothing) * nll + label_smoothing * smooth).sum()
            # d loss / d logits = softmax - (1 - eps) onehot - eps / V
            grad_logits = log_probs.exp_()
            grad_logits.sub_(label_smoothing / vocab)
            grad_logits[torch.arange(y.numel(), device=y.device), y] -= 1 - label_smoothing
            grad_logits.div_(divisor)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ w
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grads = [(g * grad_output).to(dtype) if has else None for g, has, dtype in zip(saved, ctx.has, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None


def chunked_sft_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                     lm_head_bias: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
                     ignore_index: int = -100, num_items_in_batch: Optional[int] = None,
                     chunk_size: int = 1024) -> torch.Tensor:
    """The "sft" loss computed from final hidden states (B, T, H) and the LM head (V, H), chunk by chunk.

    Equal to sft_loss(hidden @ W^T + b, labels, ...) -- mean over targets, or sum / num_items_in_batch -- while
    peak extra memory grows with chunk_size x V instead of B x T x V (forward and backward alike).
    """
    hidden, targets, _ = _targets(hidden_states, labels, ignore_index)  # (N, H), (N,)
    divisor = float(num_items_in_batch) if num_items_in_batch is not None else float(max(targets.numel(), 1))
    return _ChunkedCrossEntropy.apply(hidden, lm_head_weight, lm_head_bias, targets, label_smoothing, divisor,
                                      chunk_size)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor):
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().T  # (C, V)
        if bias is not None:
            logits = logits + bias.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_sequence_logps(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, *,
                           lm_head_bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Per-sequence sums of label log-probs (B,) from hidden states; each chunk's logits are recomputed in
    backward (activation checkpointing), so at most one (chunk_size, V) block is alive at a time."""
    hidden, targets, mask = _targets(hidden_states, labels, ignore_index)
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            pieces.append(checkpoint(_chunk_logps, h, lm_head_weight, lm_head_bias, y, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, lm_head_weight, lm_head_bias, y))
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    row_of_target = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
    return torch.zeros(mask.shape[0], dtype=torch.float32, device=flat.device).index_add(0, row_of_target, flat)
