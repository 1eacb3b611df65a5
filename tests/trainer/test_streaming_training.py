"""Training on streamed data (streaming: true): an interrupted and resumed run equals an uninterrupted one bit for
bit, preference stages stream too, and a checkpoint resumes only with the streaming setting it was saved with."""

import math

import pytest

from rlhf_time import SFTrainer
from rlhf_time.errors import RlhfTimeError
from rlhf_time.stages.trainers import trainer_for
from tests.distributed.settings import preference_files

from .helpers import assert_resume_is_exact, tiny_config, train_losses

# 20 records, windows of 3 x 4 records and a buffer of 8: the 8 steps of 2 x 4 examples cross windows and passes
# before and after the resume point (step 4).
STREAMED = dict(streaming=True, max_train_samples=20, batch_size=4, gradient_accumulation_steps=2, max_steps=8,
                shuffle_buffer_size=8, save_strategy="steps", save_steps=4, logging_steps=1)


@pytest.fixture(autouse=True)
def _small_windows(monkeypatch):
    monkeypatch.setattr("rlhf_time.data.streaming.WINDOW_BATCHES", 3)


def test_streamed_run_resumes_bit_identically(tmp_path, tiny_model_dir):
    full = SFTrainer(tiny_config(tmp_path / "full", tiny_model_dir, **STREAMED))
    full.train()
    assert (full.run_dir / "checkpoint-4" / "data_state.json").is_file()
    assert full.train_dataset.epoch >= 2  # 64 examples drawn from 20 records
    assert_resume_is_exact(full, tmp_path, tiny_model_dir, **STREAMED)


def test_a_checkpoint_resumes_only_with_its_streaming_setting(tmp_path, tiny_model_dir):
    settings = {**STREAMED, "max_steps": 2, "save_steps": 2}
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, **settings)).train()
    checkpoint = tmp_path / "outputs" / "run" / "checkpoint-2"
    plain = SFTrainer(tiny_config(tmp_path / "plain", tiny_model_dir, max_steps=2))
    with pytest.raises(RlhfTimeError, match="saved with streaming: true; resume it with the same setting"):
        plain.load_from_checkpoint(checkpoint)


def test_dpo_streams_preference_pairs(tmp_path, tiny_model_dir):
    """Step 1 of DPO, policy == reference: the loss is log 2 exactly as without streaming."""
    trainer = trainer_for(tiny_config(tmp_path, tiny_model_dir, stage="dpo", streaming=True, max_steps=2, batch_size=2,
                                      logging_steps=1, max_train_samples=None, max_eval_samples=None,
                                      **preference_files(tmp_path)))
    trainer.train()
    losses = train_losses(trainer.run_dir / "metrics.jsonl")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6) and len(losses) == 2
