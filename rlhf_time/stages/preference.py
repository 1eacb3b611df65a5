"""What the preference stages (reward model, DPO) share: pairs as data, chosen+rejected stacked in one batch,
and pairs as the loss items."""

from __future__ import annotations

import torch

from rlhf_time.data import PreferenceCollator
from rlhf_time.runtime.loop import Trainer


class PreferenceTrainer(Trainer):
    """Base of the stages trained on {prompt, chosen, rejected} pairs; the step loss is divided by the pairs."""

    data_kind = "preference"

    def collate(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, one (2B, T) batch, plus "margin" (B,)."""
        return self.collator([dataset[i] for i in indices])

    @property
    def collator(self) -> PreferenceCollator:
        if not hasattr(self, "_collator"):
            self._collator = PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)
        return self._collator

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()  # pairs
