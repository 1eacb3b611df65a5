"""Inference: turn prompts or chat messages into the model's input text and generate only the new text."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def render_generation_prompt(tokenizer, messages: list[dict[str, str]], *, prompt_template: Optional[str] = None,
                             response_template: Optional[str] = None, system_prompt: Optional[str] = None) -> str:
    """The text the model continues: the same layout as training, ending where the assistant's answer starts."""
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if not (prompt_template or response_template):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = _bos_if_expected(tokenizer)
        return text if text.startswith(bos) else bos + text  # as the training data had it
    prompt_template = prompt_template or "{prompt}"
    response_template = response_template or "{response}"
    parts = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"] + "\n")
        elif message["role"] == "user":
            parts.append(prompt_template.replace("{prompt}", message["content"]))
        else:
            parts.append(response_template.replace("{response}", message["content"]) + tokenizer.eos_token)
    parts.append(response_template.split("{response}")[0])
    return _bos_if_expected(tokenizer) + "".join(parts)


def _bos_if_expected(tokenizer) -> str:
    """Tokenizers that add a BOS themselves (Llama) get it once here, as the training data had it."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return ""
    return tokenizer.bos_token if tokenizer("a").input_ids[:1] == [bos_id] else ""


@torch.no_grad()
def generate(model: nn.Module, tokenizer, texts: list[str], *, max_new_tokens: int = 512, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50, batch_size: int = 8,
             stop_token_ids: Optional[list[int]] = None) -> list[str]:
    """Batched, left-padded generation; returns only the newly generated text of each prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos = stop_token_ids or [tokenizer.eos_token_id]
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
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
