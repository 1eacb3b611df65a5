"""Reward modelling: a scalar head on the causal LM, trained on preference pairs with the pairwise loss.

Chosen and rejected sequences go through the model in one forward pass (the collator stacks them); the
reward is read at the last non-pad token (Hugging Face's sequence-classification pooling), so the saved
folder scores identically when reloaded with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhf_time.data import PaddingCollator, PreferenceCollator, load_preference_dataset
from rlhf_time.data.formats import Messages
from rlhf_time.data.tokenize import ConversationEncoder, truncate
from rlhf_time.loss import create_loss
from rlhf_time.trainer.loop import Trainer


class RewardTrainer(Trainer):
    """Bradley-Terry reward model: loss = -log sigmoid(r_chosen - r_rejected - margin) [+ centering]."""

    model_head = "reward"

    def __init__(self, config) -> None:
        super().__init__(config)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.config.pad_token_id = self.tokenizer.pad_token_id  # where the reward is read depends on it
        self.pairwise_loss = create_loss("pairwise", margin=config.reward_margin, reduction="none")
        self.collator = PreferenceCollator(pad_token_id=self.tokenizer.pad_token_id)

    def load_dataset(self, path: str, max_samples: Optional[int]):
        return load_preference_dataset(path, self.tokenizer, self.config, cache_dir=self._cache_dir(),
                                       max_samples=max_samples)

    def collate(self, indices: list[int], dataset=None) -> dict[str, torch.Tensor]:
        dataset = dataset if dataset is not None else self.train_dataset
        return self.collator([dataset[i] for i in indices])

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()  # pairs

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards (B,), rejected rewards (B,)) from one forward pass over the stacked (2B, T) batch."""
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        scores = scores.logits.squeeze(-1).float()  # (2B,)
        pairs = batch["margin"].numel()
        return scores[:pairs], scores[pairs:]

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        chosen, rejected = self.rewards(model, batch)
        loss_sum = self.pairwise_loss(chosen, rejected, margin=batch["margin"]).sum()
        if self.config.reward_centering:  # Eisenstein et al. 2023: keeps rewards centred on zero
            loss_sum = loss_sum + self.config.reward_centering * ((chosen + rejected) ** 2).sum()
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}
        return loss_sum / num_items, metrics

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, response), laid out exactly as in training."""
        return score_conversations(self.model, self.tokenizer, self.config,
                                   [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                                    for p, r in zip(prompts, responses)], batch_size)

    def _cache_dir(self) -> str:
        return self.config.data_cache_dir or str(self.config.run_dir.parent / ".cache")


@torch.no_grad()
def score_conversations(model: nn.Module, tokenizer, config, conversations: list[Messages], batch_size: int = 16) -> list[float]:
    encoder = ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                                  response_template=config.response_template, system_prompt=config.system_prompt,
                                  max_seq_length=config.max_seq_length)
    encoded = encoder.encode_many([encoder.segments(c) for c in conversations])
    collator = PaddingCollator(pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    for start in range(0, len(encoded), batch_size):
        rows = [truncate(ids, labels, config.max_seq_length)[:2] for ids, labels in encoded[start : start + batch_size]]
        batch = collator([{"input_ids": ids, "labels": labels} for ids, labels in rows])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        rewards += logits.squeeze(-1).float().tolist()
    model.train(was_training)
    return rewards


def load_reward_model(model_dir: str):
    """A trained reward model folder (full, or a LoRA adapter with its score head) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def score_file(model_dir: str, input_path: str, output_path: str) -> None:
    """`rlhf-time score`: rewards of the prompt/response records of a file, written as JSONL."""
    import yaml

    from rlhf_time.config import TrainingConfig
    from rlhf_time.data import read_records
    from rlhf_time.data.formats import detect_format, to_messages

    model, tokenizer = load_reward_model(model_dir)
    saved = Path(model_dir) / "rlhf_time_config.yaml"
    stored = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    keep = ("prompt_template", "response_template", "system_prompt", "max_seq_length")
    config = TrainingConfig(**{k: stored[k] for k in keep if k in stored})
    records = read_records(input_path)
    fmt = detect_format(records[0], "auto")
    conversations = [to_messages(r, fmt) for r in records]
    rewards = score_conversations(model, tokenizer, config, conversations)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as handle:
        for record, reward in zip(records, rewards):
            handle.write(json.dumps({**record.data, "reward": reward}, ensure_ascii=False) + "\n")
