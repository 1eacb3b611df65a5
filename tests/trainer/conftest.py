"""Fixtures shared by the trainer tests."""

import pytest

from .helpers import tiny_config


@pytest.fixture(scope="session")
def half_trained(tmp_path_factory, tiny_model_dir):
    """The quickstart model trained part-way with SFT: it writes some digits right (dense reward ~0.3-0.4).
    Trained once per session for the GRPO and PPO learning tests."""
    from rlhf_time import SFTrainer

    folder = tmp_path_factory.mktemp("half")
    config = tiny_config(folder, tiny_model_dir, max_train_samples=None, batch_size=16, learning_rate=2e-3,
                         max_steps=150, lr_scheduler_type="constant", weight_decay=0.0)
    return SFTrainer(config).train()["final_model_dir"]
