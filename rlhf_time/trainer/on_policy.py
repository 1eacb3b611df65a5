"""What the on-policy stages (GRPO, PPO) share: prompt-only data, and micro-batches of prompt indices that
prepare_step turns into sampled, scored experience."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_time.data.prompts import PromptDataset, load_prompt_dataset
from rlhf_time.trainer.loop import Trainer


class PromptTrainer(Trainer):
    """Base of the stages that generate their own training sequences from prompts."""

    data_kind = "prompt"

    def load_dataset(self, path: str, max_samples: Optional[int]) -> PromptDataset:
        return load_prompt_dataset(path, self.tokenizer, self.config, max_samples=max_samples)

    def collate(self, indices: list[int], dataset=None) -> dict[str, torch.Tensor]:
        """Prompt indices only: the tensors the loss trains on are made in prepare_step."""
        dataset = dataset if dataset is not None else self.train_dataset
        return {"prompt_index": torch.tensor(indices, dtype=torch.long),
                "dataset": torch.tensor(self.dataset_key(dataset))}

    def dataset_key(self, dataset: PromptDataset) -> int:
        """A small integer naming `dataset` inside a batch (train, eval, or one passed to evaluate())."""
        known = self.__dict__.setdefault("prompt_datasets", [])
        if not any(d is dataset for d in known):
            known.append(dataset)
        return next(i for i, d in enumerate(known) if d is dataset)

    def prompt_dataset(self, batch: dict[str, torch.Tensor]) -> PromptDataset:
        return self.prompt_datasets[int(batch["dataset"])]
