"""Real run folders for the web UI's tests: a finished tiny SFT run and one stopped by SIGTERM after a checkpoint,
trained in this process (no browser)."""

from __future__ import annotations

import os
import signal

import pytest

from rlhf_time.errors import TrainingInterrupted
from tests.trainer.helpers import tiny_config


@pytest.fixture(scope="session")
def run_folders(tmp_path_factory, tiny_model_dir):
    """{"output_dir", "finished": (run_dir, results), "interrupted": run_dir}: two runs of the tiny model."""
    from rlhf_time import SFTrainer

    root = tmp_path_factory.mktemp("webui-runs")
    settings = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    logging_steps=1, plot_metrics=True)
    finished = SFTrainer(tiny_config(root, tiny_model_dir, experiment_name="finished", **settings))
    results = finished.train()

    stopped = SFTrainer(tiny_config(root, tiny_model_dir, experiment_name="stopped", **{**settings, "max_steps": 8}))
    stopped.callbacks.append(lambda trainer: trainer.global_step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted):
        stopped.train()
    return {"output_dir": root / "outputs", "finished": (finished.run_dir, results), "interrupted": stopped.run_dir}
