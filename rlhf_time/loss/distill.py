"""Distillation loss from both models' final hidden states, chunk by chunk over the target positions.

Neither model's (B, T, V) float32 logits exist at once: each chunk of target positions is projected by both LM
heads, its loss summed, and the chunk is recomputed in backward (activation checkpointing) instead of kept.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf_time.loss.functions import kd_divergence
from rlhf_time.loss.logps import DEFAULT_CHUNK_BYTES, chunk_rows


def chunked_kd_loss(student_states: torch.Tensor, teacher_states: torch.Tensor, labels: torch.Tensor, *,
                    student_head: Optional[nn.Module] = None, teacher_head: Optional[nn.Module] = None,
                    vocab_size: Optional[int] = None, alpha: float = 0.0, temperature: float = 1.0,
                    kind: str = "forward_kl", beta: float = 0.5, label_smoothing: float = 0.0,
                    num_items_in_batch: Optional[int] = None, chunk_size: Optional[int] = None,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                    ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = sum_t [alpha * CE_t + (1 - alpha) * KD_t] / num_items   over target positions t (labels shifted)

    CE_t = -log p_S(y_t) (label smoothing as the SFT loss); KD_t = kd_divergence(student, teacher) at t.
    states: final hidden states (B, T, H) when the matching head is given, else logits (B, T, V).
    vocab_size: compare only the first V columns (heads padded beyond the tokenizer); CE uses the student's all.
    Returns (loss, {"kd": sum KD_t, "ce": sum CE_t, "correct": #argmax hits, "tokens": #targets}), sums detached.
    """
    shifted = labels[:, 1:]  # (B, T-1)
    mask = shifted != ignore_index
    student, teacher, targets = student_states[:, :-1][mask], teacher_states[:, :-1][mask], shifted[mask]  # (N, .)
    divisor = num_items_in_batch if num_items_in_batch is not None else targets.numel()

    def chunk_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        with torch.autocast(device_type=s.device.type, enabled=False):  # logits in the heads' own dtype, then fp32
            s_logits, t_logits = _project(s, student_head), _project(t, teacher_head)  # (C, V_s), (C, V_t)
        width = vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
        kd = kd_divergence(s_logits[:, :width], t_logits[:, :width], temperature=temperature, kind=kind, beta=beta)
        ce = F.cross_entropy(s_logits, y, reduction="none", label_smoothing=label_smoothing)  # (C,)
        correct = (s_logits.argmax(-1) == y).sum()
        return (alpha * ce + (1 - alpha) * kd).sum(), kd.detach().sum(), ce.detach().sum(), correct

    total = student.new_zeros((), dtype=torch.float32)
    sums = {name: total.new_zeros(()) for name in ("kd", "ce", "correct")}
    track = torch.is_grad_enabled() and (student.requires_grad or any(p.requires_grad for p in _parameters(student_head)))
    # Sized by the student's logit rows (V float32 values per position) unless chunk_size is given.
    rows = chunk_rows(vocab_size or (student_head.weight.shape[0] if student_head is not None else student.shape[-1]),
                      chunk_size, chunk_bytes)
    for start in range(0, targets.numel(), rows):
        pieces = (student[start : start + rows], teacher[start : start + rows].detach(), targets[start : start + rows])
        if track:  # recompute the chunk's logits in backward instead of keeping them
            loss, kd, ce, correct = checkpoint(chunk_loss, *pieces, use_reentrant=False)
        else:
            loss, kd, ce, correct = chunk_loss(*pieces)
        total = total + loss
        sums["kd"] += kd
        sums["ce"] += ce
        sums["correct"] += correct
    sums["tokens"] = total.new_tensor(float(targets.numel()))
    return total / max(divisor, 1), sums


def _project(states: torch.Tensor, head: Optional[nn.Module]) -> torch.Tensor:
    """Float32 logits of a chunk: head(states) in the head's dtype (a bf16 teacher stays bf16), or states themselves."""
    if head is None:
        return states.float()
    return F.linear(states.to(head.weight.dtype), head.weight, head.bias).float()


def _parameters(module: Optional[nn.Module]):
    return module.parameters() if module is not None else ()
