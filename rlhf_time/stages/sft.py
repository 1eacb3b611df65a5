"""Supervised fine-tuning: how a batch of (input_ids, labels) becomes a loss. Everything else is the shared loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data import PackingCollator, PaddingCollator
from rlhf_time.loss import chunked_sft_loss, create_loss, label_cross_entropy_and_hits
from rlhf_time.runtime.loop import Trainer
# Smallest packed row (sdpa/eager): short examples share a row; the (N x N) mask stays small.
PACKED_ROW_TOKENS = 256


class SFTrainer(Trainer):
    """Next-token cross-entropy on response tokens, normalised by the target tokens of the whole optimiser step."""

    data_kind = "conversation"
    model_head = "causal_lm"

    def collate(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        return self.collator([dataset[i] for i in indices])

    @property
    def collator(self):
        if not hasattr(self, "_collator"):
            pad = self.tokenizer.pad_token_id
            if self.config.packing:
                varlen = (self.config.attn_implementation or "").startswith("flash_attention")
                self._collator = PackingCollator(pad, row_length=PACKED_ROW_TOKENS, varlen=varlen)
            else:
                self._collator = PaddingCollator(pad_token_id=pad)
        return self._collator

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        config = self.config
        hidden, lm_head = self.final_hidden_states(model, batch)
        if lm_head is not None:
            # Memory-lean: logits are formed a chunk of target positions at a time, never (B, T, V) at once.
            loss = chunked_sft_loss(
                hidden, lm_head.weight, batch["labels"], lm_head_bias=lm_head.bias, label_smoothing=config.label_smoothing,
                num_items_in_batch=num_items, chunk_size=config.loss_chunk_size, chunk_bytes=config.loss_chunk_bytes,
            )
        else:
            loss = self.sft_loss(hidden, batch["labels"], num_items_in_batch=num_items)
        return loss, {}

    @property
    def sft_loss(self):
        if not hasattr(self, "_sft_loss"):
            self._sft_loss = create_loss("sft", label_smoothing=self.config.label_smoothing)
        return self._sft_loss

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """Summed cross-entropy (no smoothing), correct argmax predictions and target count over a batch."""
        hidden, lm_head = self.final_hidden_states(model, batch)
        return label_cross_entropy_and_hits(hidden, batch["labels"], lm_head, chunk_size=self.config.loss_chunk_size,
                                            chunk_bytes=self.config.loss_chunk_bytes)

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        tokens = max(totals.get("tokens", 0.0), 1.0)
        loss = totals.get("loss_sum", 0.0) / tokens
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": totals.get("correct", 0.0) / tokens,
            "eval_tokens": totals.get("tokens", 0.0),
        }
