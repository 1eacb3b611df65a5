"""Inference: turn prompts or chat messages into the model's input text and generate only the new text."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_time.data.tokenize import ConversationEncoder


def render_generation_prompt(tokenizer, messages: list[dict[str, str]], *, prompt_template: Optional[str] = None,
                             response_template: Optional[str] = None, system_prompt: Optional[str] = None) -> str:
    """The text the model continues: the training layout, ending where the assistant's answer starts."""
    encoder = ConversationEncoder(tokenizer, prompt_template=prompt_template, response_template=response_template,
                                  system_prompt=system_prompt)
    return encoder.generation_prompt(messages)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, texts: list[str], *, max_new_tokens: int = 512, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50, batch_size: int = 8,
             stop_token_ids: Optional[list[int]] = None, progress: bool = False) -> list[str]:
    """Batched, left-padded generation; returns only the newly generated text of each prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos = stop_token_ids or [tokenizer.eos_token_id]
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    outputs: list[str] = []
    starts = range(0, len(texts), batch_size)
    try:
        for start in tqdm(starts, desc="generate", unit="batch", leave=False, dynamic_ncols=True,
                          disable=not progress or len(starts) < 2):
            encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [text.strip() for text in outputs]


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], *, pad_token_id: int, stop_token_ids: list[int],
                       max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       synced_gpus: bool = False) -> list[list[int]]:
    """Sampled continuations of tokenised prompts (one batch, left-padded, KV cache), each cut just after its first
    stop token (kept: it is trained as the end of the turn) or at max_new_tokens.

    synced_gpus: keep every rank stepping until all are done (FSDP ranks must run the same forwards).
    """
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    try:
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   eos_token_id=stop_token_ids, pad_token_id=pad_token_id, synced_gpus=synced_gpus)
    finally:
        model.train(was_training)
    completions = []
    for row in generated[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_token_ids), len(row))
        completions.append(row[:end])
    return completions
