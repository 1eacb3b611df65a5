"""Collators: lists of tokenised examples -> padded tensors (labels padded with -100, never trained)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.errors import RlhfTimeError


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def _padded_length(rows: list[list[int]], multiple: Optional[int]) -> int:
    length = max(map(len, rows))
    return -(-length // multiple) * multiple if multiple else length


class PaddingCollator:
    """Right-pads examples to the longest in the batch: input_ids, attention_mask, labels, each (B, T)."""

    def __init__(self, pad_token_id: int, label_pad: int = IGNORE_INDEX, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise RlhfTimeError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
        self.pad_token_id, self.label_pad, self.multiple = pad_token_id, label_pad, pad_to_multiple_of

    def pad(self, input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        length = _padded_length(input_ids, self.multiple)
        return {
            "input_ids": _pad(input_ids, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(row) for row in input_ids], 0, length),
            "labels": _pad(labels, self.label_pad, length),
        }

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.pad([e["input_ids"] for e in examples], [e["labels"] for e in examples])


class PreferenceCollator(PaddingCollator):
    """Chosen rows then rejected rows in one (2B, T) batch, so both go through the model in one forward pass;
    "margin" (B,) float32, nan where a pair has none."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad([e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples],
                         [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples])
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
        return batch
