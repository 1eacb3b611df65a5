"""Small builders shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_time import TrainingConfig
from rlhf_time.quickstart_task import EVAL_FILE, TRAIN_FILE


def tiny_config(tmp_path: Path, model_dir: Path, **overrides) -> TrainingConfig:
    values = dict(
        experiment_name="run", output_dir=str(tmp_path / "outputs"), model_name=str(model_dir),
        train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE), max_train_samples=48, max_eval_samples=16,
        batch_size=8, learning_rate=1e-3, num_train_epochs=1, max_seq_length=64, eval_strategy="no",
        save_strategy="no", report_to="none", disable_progress_bar=True, data_cache_dir=str(tmp_path / "cache"),
        warmup_steps_ratio=0.0, max_new_tokens=8,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
