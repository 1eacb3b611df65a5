"""Plain text for continued pre-training: every token is a target, long documents become several examples.

A document is [BOS if the tokenizer adds one] + its tokens + [EOS], cut into consecutive blocks of at most
max_seq_length tokens (no token is dropped, unlike the truncation of conversations). labels == input_ids, so the
loss covers every token the model is asked to predict: each block's first token has no prediction (as in any
causal LM), which is the only position without a loss.
"""

from __future__ import annotations

import json

from rlhf_time.data.readers import Record, field_list
from rlhf_time.errors import RlhfTimeError


def text_of(record: Record) -> str:
    """The record's `text` field, checked (a non-empty string)."""
    if "text" not in record.data:
        raise RlhfTimeError(f"{record.location}: missing field 'text' (record has: "
                            f"{field_list(record.data) or 'nothing'}); data_format text needs it "
                            f"(map another column with columns: {{text: your_column}})")
    value = record.data["text"]
    if not isinstance(value, str):
        raise RlhfTimeError(f"{record.location}: field 'text' must be a string, got {json.dumps(value)[:40]}")
    if not value.strip():
        raise RlhfTimeError(f"{record.location}: field 'text' is empty")
    return value


def encode_documents(texts: list[str], tokenizer, max_seq_length: int) -> list[list[int]]:
    """Token blocks (each <= max_seq_length) of every document, in order."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "split_special_tokens", False):
        token_lists = [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    # A BOS only where the tokenizer itself adds one (Llama); Qwen's tokenizers add none.
    prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    blocks = []
    for tokens in token_lists:
        document = prefix + list(tokens) + suffix
        blocks += [document[start : start + max_seq_length] for start in range(0, len(document), max_seq_length)]
    return blocks
