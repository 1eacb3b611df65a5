"""Reward modelling: a scalar head on the causal LM, trained on preference pairs with the pairwise loss.

Chosen and rejected sequences go through the model in one forward pass (the collator stacks them); the
reward is read at the last non-pad token (Hugging Face's sequence-classification pooling), so the saved
folder scores identically when reloaded with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhf_time.loss import create_loss
from rlhf_time.stages.preference import PreferenceTrainer


class RewardTrainer(PreferenceTrainer):
    """Bradley-Terry reward model: loss = -log sigmoid(r_chosen - r_rejected - margin) [+ centering]."""

    model_head = "reward"

    def __init__(self, config) -> None:
        super().__init__(config)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.config.pad_token_id = self.tokenizer.pad_token_id  # where the reward is read depends on it
        self.pairwise_loss = create_loss("pairwise", margin=config.rm.margin, reduction="none")

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards (B,), rejected rewards (B,)) from one forward pass over the stacked (2B, T) batch."""
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        scores = scores.logits.squeeze(-1).float()  # (2B,)
        pairs = batch["margin"].numel()
        return scores[:pairs], scores[pairs:]

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        chosen, rejected = self.rewards(model, batch)
        loss_sum = self.pairwise_loss(chosen, rejected, margin=batch["margin"]).sum()
        if self.config.rm.centering:  # Eisenstein et al. 2023: keeps rewards centred on zero
            loss_sum = loss_sum + self.config.rm.centering * ((chosen + rejected) ** 2).sum()
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}
        return loss_sum / num_items, metrics

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        chosen, rejected = self.rewards(model, batch)
        both = torch.cat([chosen, rejected])
        return {
            "loss_sum": self.pairwise_loss(chosen, rejected, margin=batch["margin"]).sum(),
            "correct": (chosen > rejected).float().sum(),
            "margin_sum": (chosen - rejected).sum(),
            "reward_sum": both.sum(),
            "reward_sq_sum": (both**2).sum(),
            "pairs": torch.tensor(float(chosen.numel()), device=chosen.device),
        }

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = max(totals.get("pairs", 0.0), 1.0)
        mean = totals.get("reward_sum", 0.0) / (2 * pairs)
        variance = max(totals.get("reward_sq_sum", 0.0) / (2 * pairs) - mean**2, 0.0)
        return {
            "eval_loss": totals.get("loss_sum", 0.0) / pairs,
            "eval_accuracy": totals.get("correct", 0.0) / pairs,
            "eval_margin": totals.get("margin_sum", 0.0) / pairs,
            "eval_reward_mean": mean,
            "eval_reward_std": math.sqrt(variance),
        }

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, response), laid out exactly as in training."""
        return self.inference.score(prompts, responses, batch_size=batch_size)
