"""Run folders are never silently clobbered; each stage has its own default folder; example YAMLs run from anywhere."""

import json
import os
from pathlib import Path

import pytest
import yaml

from rlhf_time import SFTrainer, TrainingConfig
from rlhf_time.cli import main
from rlhf_time.errors import RlhfTimeError

from .helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, tiny_model_dir):
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1)).train()
    final = tmp_path / "outputs" / "run" / "final" / "model.safetensors"
    before = final.read_bytes()
    with pytest.raises(RlhfTimeError, match=r"already holds a run \(config\.yaml, metrics\.jsonl, final\).*"
                                            r"resume_from_checkpoint=latest.*overwrite_output_dir=true"):
        SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1, learning_rate=1e-2)).train()
    assert final.read_bytes() == before


def test_overwrite_output_dir_replaces_the_old_run(tmp_path, tiny_model_dir):
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=2, logging_steps=1, save_strategy="steps",
                          save_steps=1)).train()
    run_dir = tmp_path / "outputs" / "run"
    assert (run_dir / "checkpoint-1").is_dir()
    SFTrainer(tiny_config(tmp_path, tiny_model_dir, max_steps=1, logging_steps=1, overwrite_output_dir=True)).train()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 1]  # this run's step 1 and its summary row; nothing of the old run
    assert not (run_dir / "checkpoint-1").exists() and not (run_dir / "checkpoint-2").exists()


def test_the_cli_refusal_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    from rlhf_time.data.quickstart import TRAIN_FILE

    config = dict(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "out"), experiment_name="cli",
                  train_file=str(TRAIN_FILE), max_train_samples=8, batch_size=4, max_steps=1, report_to="none",
                  disable_progress_bar=True, save_strategy="no", eval_strategy="no", max_seq_length=64,
                  plot_metrics=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "already holds a run" in err[0]


def test_each_stage_defaults_to_its_own_experiment_name():
    assert TrainingConfig().experiment_name == "sft_experiment"
    assert TrainingConfig(stage="rm").experiment_name == "rm_experiment"
    assert TrainingConfig(stage="dpo").experiment_name == "dpo_experiment"
    assert TrainingConfig(stage="dpo", experiment_name="mine").experiment_name == "mine"


def test_example_configs_use_distinct_experiment_names():
    names = [yaml.safe_load((ROOT / "examples" / name).read_text())["experiment_name"]
             for name in sorted(os.listdir(ROOT / "examples")) if name.endswith(".yaml")]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_example_data_paths_resolve_from_another_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainingConfig.from_yaml(ROOT / "examples" / name)
    assert config.train_file and Path(config.train_file).is_file(), config.train_file
    assert config.eval_file is None or Path(config.eval_file).is_file(), config.eval_file


def test_an_example_trains_from_another_directory(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(ROOT / "examples" / "rm.yaml"), f"model_name={tiny_model_dir}", "max_steps=1",
                 "max_train_samples=8", "max_eval_samples=8", "report_to=none", "disable_progress_bar=true",
                 "plot_metrics=false", "save_strategy=no", f"data_cache_dir={tmp_path / 'cache'}"])
    assert code == 0 and (tmp_path / "outputs" / "rm" / "final").is_dir()


def test_paths_given_as_overrides_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    monkeypatch.chdir(tmp_path)
    config = TrainingConfig.from_yaml(ROOT / "examples" / "sft_full.yaml", ["train_file=mine.jsonl"])
    assert config.train_file == "mine.jsonl"
