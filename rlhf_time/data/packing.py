"""Padding-free packing: a micro-batch's examples concatenated into rows, attention kept inside each example.

Each packed row holds whole examples back to back; `position_ids` restart at 0 for every example, and the first
label of every example is -100, so no token is ever trained to predict the start of the next example.

How attention is kept inside examples depends on the kernel:
  - FlashAttention (`varlen=True`): one row, no attention_mask; transformers reads the example boundaries from
    the restarting `position_ids` and calls the variable-length kernel (cost per example, no padding at all).
  - sdpa / eager: a block-diagonal causal boolean mask (R, 1, N, N). `position_ids` alone do NOT separate the
    examples there. The masked kernel still pays for every (N x N) score, so rows are kept short: examples are
    placed first-fit decreasing into rows of at most max(longest example, `row_length`) tokens, which never
    costs more attention than the padded batch of the same examples.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_time.constants import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices (longest first) whose lengths sum to at most `capacity` each (an item longer gets its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, N, N) bool, True = may attend: causal and only within the same segment of the row."""
    n = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, N, N)
    return (same & torch.ones(n, n, dtype=torch.bool).tril())[:, None]


class PackingCollator:
    """Packs examples into rows: input_ids, labels, position_ids (R, N), attention_mask (R, 1, N, N) unless
    `varlen`, and seq_lens (number of examples,) -- the real length of every packed example.

    Args:
        pad_token_id: fills the tail of rows shorter than the longest row.
        row_length: smallest row capacity (tokens); rows may grow to the batch's longest example.
        varlen: FlashAttention layout -- everything in one row, no attention_mask.
    """

    def __init__(self, pad_token_id: int, row_length: int = 0, varlen: bool = False) -> None:
        self.pad_token_id, self.row_length, self.varlen = pad_token_id, row_length, varlen

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        if self.varlen:
            rows = [list(range(len(examples)))]
        else:
            rows = first_fit_decreasing(lengths, max(max(lengths), self.row_length))
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
        seq_lens = []
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row):
                stop = start + lengths[i]
                input_ids[r, start:stop] = torch.tensor(examples[i]["input_ids"])
                labels[r, start:stop] = torch.tensor(examples[i]["labels"])
                labels[r, start] = IGNORE_INDEX  # never predicted from the previous example's last token
                position_ids[r, start:stop] = torch.arange(lengths[i])
                segment_ids[r, start:stop] = segment
                seq_lens.append(lengths[i])
                start = stop
            # The padded tail is a segment of its own: it attends only to itself, so no fully masked (NaN) rows.
            position_ids[r, start:] = torch.arange(width - start)
            segment_ids[r, start:] = len(row)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "seq_lens": torch.tensor(seq_lens, dtype=torch.long)}
        if not self.varlen:
            batch["attention_mask"] = block_causal_mask(segment_ids)
        return batch
