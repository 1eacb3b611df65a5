"""Every stage with the defaults a user gets (charts, report.md, progress bar, TensorBoard, checkpoints, evaluation
settings): only the model, the data, max_steps (and for sampling stages the completion length) are given. The on-policy stages and KD run without eval_file, the
common case, and no trainer writes into the user's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE
from rlhf_time.stages.trainers import trainer_for

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
PREFERENCE = dict(train_file=str(EXAMPLE_DATA / "preference_train.jsonl"),
                  eval_file=str(EXAMPLE_DATA / "preference_eval.jsonl"))
# Sizes of the work shrink as max_steps does (256 sampled tokens per completion would take minutes on 2 cores);
# every setting of what the run writes and shows stays the default.
PROMPTS = dict(train_file=str(EXAMPLE_DATA / "grpo_train.jsonl"),
               rollout={"reward_funcs": ["exact_match"], "max_completion_length": 16})

STAGES = {
    "sft": dict(train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE)),
    "rm": PREFERENCE,
    "dpo": PREFERENCE,
    "kto": dict(train_file=str(EXAMPLE_DATA / "kto_train.jsonl"), eval_file=PREFERENCE["eval_file"]),
    "kd": dict(train_file=str(TRAIN_FILE)),  # kd.teacher_model: the fixture's model
    "grpo": PROMPTS,
    "ppo": PROMPTS,
    "online_dpo": PROMPTS,
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_runs_on_the_defaults(stage, tmp_path, tiny_model_dir):
    values = dict(stage=stage, model_name=str(tiny_model_dir), output_dir=str(tmp_path / "out"), max_steps=2,
                  **STAGES[stage])
    if stage == "kd":
        values["kd"] = {"teacher_model": str(tiny_model_dir)}
    config = TrainingConfig(**values)
    as_given = config.model_dump()
    trainer = trainer_for(config)
    results = trainer.train()
    assert config.model_dump() == as_given  # the trainer resolved its own values without writing them here

    run_dir = tmp_path / "out" / f"{stage}_experiment"
    assert results["global_step"] == 2 and (run_dir / "final").is_dir()
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file()  # save_strategy epoch: the last step saves
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "plots" / "loss.png").is_file()
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    if trainer.model_head == "causal_lm":
        assert "## Sample generations" in report
    if "eval_file" not in values:
        assert results["best_metric"] is None and results["best_checkpoint"] is None


def test_results_name_a_best_folder_that_exists(tmp_path, tiny_model_dir):
    """With save_strategy no (as the quickstart), the best evaluation's weights are final/ when it was the last
    step: results and report.md name that folder, never a checkpoint that was not written."""
    config = TrainingConfig(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "out"), max_steps=2,
                            train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE), save_strategy="no",
                            eval_strategy="steps", eval_steps=1, learning_rate=1e-3)
    results = trainer_for(config).train()
    assert results["best_step"] == 2  # the loss falls at this learning rate
    assert results["best_checkpoint"] == results["final_model_dir"] and Path(results["best_checkpoint"]).is_dir()
    report = (config.run_dir / "report.md").read_text(encoding="utf-8")
    assert "checkpoint-" not in report.split("## Config")[0]
