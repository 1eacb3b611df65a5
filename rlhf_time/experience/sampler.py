"""The one generation path: prompts (token ids) in, completions with their sampling log-probs out.

Used by every on-policy stage (GRPO: G completions per prompt; PPO: one, its critic scores `Rollout.input_ids`;
on-policy KD: the student's replies) and by predict / chat (greedy or sampled). An engine is anything with
`sample(prompts, params, num_samples=, generator=) -> Rollout` (the `SamplingEngine` protocol); `KVCacheEngine`
runs the model itself with a KV cache. Another engine (vLLM, continuous batching) is one class that fills the
protocol and returns the same `Rollout`.

Layout of every row: the prompt left-padded to P tokens, then the completion right-padded to C tokens, so the
training forward runs on exactly the sequence and positions that were sampled:

    input_ids      (N, P + C)   pad..pad prompt | completion pad..pad
    attention_mask (N, P + C)   0 on padding
    position_ids   (N, P + C)   cumsum(attention_mask) - 1: a left-padded prompt starts at position 0

The log-prob of a sampled token is log softmax(logits / temperature) over the whole vocabulary, the policy the
loss differentiates; top-k / top-p only restrict which tokens may be drawn (as in TRL and OpenRLHF).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn


@dataclass
class Rollout:
    """Sampled completions and their generation-time statistics; rows i*G .. i*G+G-1 belong to prompt i."""

    input_ids: torch.Tensor  # (N, P + C) long
    attention_mask: torch.Tensor  # (N, P + C) long
    prompt_length: int  # P
    completion_mask: torch.Tensor  # (N, C) bool: sampled tokens, the stop token included
    truncated: torch.Tensor  # (N,) bool: no stop token within max_new_tokens
    logps: torch.Tensor  # (N, C) float32, 0 where masked: log-probs of the sampled tokens at sampling time
    entropies: torch.Tensor  # (N, C) float32, 0 where masked: entropy of the distribution each token came from
    episodes: Optional[list] = None  # multi-turn rollouts: one Episode per row (rlhf_time.experience.episodes)

    @property
    def completion_ids(self) -> torch.Tensor:  # (N, C)
        return self.input_ids[:, self.prompt_length :]

    @property
    def position_ids(self) -> torch.Tensor:  # (N, P + C)
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_lengths(self) -> torch.Tensor:  # (N,)
        return self.completion_mask.sum(-1)

    def completion_lists(self) -> list[list[int]]:
        """Each completion's token ids (the stop token included), unpadded."""
        return [row[mask].tolist() for row, mask in zip(self.completion_ids.cpu(), self.completion_mask.cpu())]

    def to(self, device) -> "Rollout":
        return Rollout(**{f.name: (getattr(self, f.name).to(device) if torch.is_tensor(getattr(self, f.name))
                                   else getattr(self, f.name)) for f in fields(self)})


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with every token outside the top-k and outside the smallest set whose probability reaches
    top_p (nucleus, Holtzman et al. 2020) set to -inf; the most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
           stop_token_ids: Sequence[int], num_samples: int = 1, do_sample: bool = True, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, generator: Optional[torch.Generator] = None,
           stop_early: bool = True) -> Rollout:
    """Sample `num_samples` completions of each prompt (token id lists) in one batch with a KV cache.

    A row stops at its first stop token (kept as the completion's last token); finished rows leave the batch
    (their cache rows are dropped), and sampling ends when every row has finished or at max_new_tokens.
    stop_early=False keeps every row to max_new_tokens forwards (FSDP: every rank must run the same number of
    forwards). Greedy (do_sample=False) takes the argmax; its log-probs are then those of temperature 1.
    The model's training mode is restored afterwards; sampling itself runs in eval mode (no dropout).
    """
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    n, prompt_length = len(rows), max(map(len, rows))
    prompt_ids = torch.tensor([[pad_token_id] * (prompt_length - len(r)) + r for r in rows], device=device)
    prompt_mask = torch.tensor([[0] * (prompt_length - len(r)) + [1] * len(r) for r in rows], device=device)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(n, max_new_tokens)], dim=1)  # (N, P + C)
    completion = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(n, max_new_tokens, device=device)
    entropies = torch.zeros(n, max_new_tokens, device=device)
    stops = torch.tensor(sorted(set(stop_token_ids)), device=device)
    temperature = temperature if do_sample else 1.0

    was_training = model.training
    model.eval()
    try:
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        # Each distinct prompt is read once; its cache and last logits are then copied to its num_samples rows.
        rows_of_prompt = slice(None, None, num_samples)
        out = model(input_ids=prompt_ids[rows_of_prompt], attention_mask=prompt_mask[rows_of_prompt],
                    position_ids=positions[rows_of_prompt], use_cache=True, logits_to_keep=1)
        cache, next_position = out.cache, positions[:, -1] + 1  # (N,); transformers 5: `cache`, not past_key_values
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
        logits = out.logits[:, -1].repeat_interleave(num_samples, dim=0)  # (N, V)
        active = torch.arange(n, device=device)  # original row of each row still in the batch (and cache)
        alive = torch.ones(n, dtype=torch.bool, device=device)  # per active row (stop_early=False keeps dead rows)
        for step in range(max_new_tokens):
            # (A, V) float32 arrays are the cost of a step at a large vocabulary: each is formed once, and rows
            # are selected only when some are dead (stop_early=False), never copied otherwise.
            scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
            log_probs = scaled.log_softmax(-1)  # (A, V)
            if do_sample:
                probs = filter_logits(log_probs, top_k=top_k, top_p=top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (A,)
            else:
                token = log_probs.argmax(-1)
            every_row = bool(alive.all())
            rows_now, token_alive = (active, token) if every_row else (active[alive], token[alive])
            alive_log_probs = log_probs if every_row else log_probs[alive]
            completion[rows_now, step] = token_alive
            attention_mask[rows_now, prompt_length + step] = 1
            logps[rows_now, step] = alive_log_probs.gather(-1, token_alive[:, None]).squeeze(-1)
            entropies[rows_now, step] = -(alive_log_probs.exp() * alive_log_probs).nan_to_num_().sum(-1)
            alive = alive & ~torch.isin(token, stops)
            if step == max_new_tokens - 1 or (stop_early and not alive.any()):
                break
            if stop_early and not alive.all():  # finished rows leave the batch and the cache
                keep = alive.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, token, next_position, alive = active[keep], token[keep], next_position[keep], alive[keep]
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            logits = model(input_ids=token[:, None], attention_mask=attention_mask[active, : prompt_length + step + 1],
                           position_ids=next_position[:, None], cache=cache, use_cache=True).logits[:, -1]
            next_position = next_position + 1
    finally:
        model.train(was_training)

    completion_mask = attention_mask[:, prompt_length:].bool()  # (N, C)
    width = int(completion_mask.sum(-1).max())  # columns past the longest completion carry nothing
    completion_mask = completion_mask[:, :width]
    completion = completion[:, :width]
    ended = (torch.isin(completion, stops) & completion_mask).any(-1)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
        prompt_length=prompt_length,
        completion_mask=completion_mask,
        truncated=~ended,
        logps=logps[:, :width],
        entropies=entropies[:, :width],
    )


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. Greedy (do_sample=False) takes the argmax; its log-probs are those of temperature
    1. stop_early=False keeps every row to max_new_tokens forwards (FSDP: every rank runs the same forwards)."""

    max_new_tokens: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_early: bool = True


class SamplingEngine(Protocol):
    """Prompts in, token ids and sampling log-probs out: the contract every engine fills."""

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, num_samples: int = 1,
               generator: Optional[torch.Generator] = None) -> Rollout: ...


class KVCacheEngine:
    """Sampling by the model being trained, in this process, batched with a KV cache (see `sample`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, num_samples: int = 1,
               generator: Optional[torch.Generator] = None) -> Rollout:
        return sample(self.model, prompts, max_new_tokens=params.max_new_tokens, pad_token_id=params.pad_token_id,
                      stop_token_ids=params.stop_token_ids, num_samples=num_samples, do_sample=params.do_sample,
                      temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, generator=generator,
                      stop_early=params.stop_early)


def sampling_generator(seed: int, step: int, rank: int, micro_batch: int, device) -> torch.Generator:
    """The sampling RNG of one micro-batch, a pure function of (seed, step, rank, micro-batch): a resumed run
    samples exactly what the uninterrupted run sampled, and ranks sample independently."""
    state = np.random.SeedSequence([seed, step, rank, micro_batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state >> 1))
