"""Starting a run from the page: the library's validation first (the CLI's one-line errors), then the YAML in the
run folder, then `rlhf-time train` as a child process whose output and exit code land in the run folder."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml

from rlhf_time.cli import main
from rlhf_time.config import TrainingConfig
from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE
from rlhf_time.errors import RlhfTimeError
from rlhf_time.webui.control import RunControl, resume_config, write_run_config
from rlhf_time.webui.runs import LOG_FILE, log_tail, run_state


def test_the_yaml_holds_the_given_keys_typed_and_reads_back_as_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(TRAIN_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    values = {"stage": "dpo", "model_name": "tiny", "train_file": "train.jsonl", "output_dir": str(tmp_path / "out"),
              "learning_rate": "2e-3", "dpo": {"beta": 0.25}}
    path = write_run_config(values)
    assert path == tmp_path / "out" / "dpo_experiment" / "config.yaml"
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert written == {"stage": "dpo", "model_name": "tiny", "train_file": str(tmp_path / "train.jsonl"),
                       "output_dir": str(tmp_path / "out"), "learning_rate": 0.002, "dpo": {"beta": 0.25}}
    assert TrainingConfig.from_yaml(path) == TrainingConfig(**{**values, "train_file": str(tmp_path / "train.jsonl")})


def test_a_config_error_is_the_clis_line_and_writes_nothing(tmp_path, capsys):
    values = {"model_name": "tiny", "train_file": str(TRAIN_FILE), "batch_size": 0, "output_dir": str(tmp_path)}
    with pytest.raises(RlhfTimeError) as error:
        write_run_config(values)
    assert list(tmp_path.iterdir()) == []
    yaml_file = tmp_path.parent / f"{tmp_path.name}.yaml"
    yaml_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    assert main(["train", str(yaml_file)]) == 2
    assert capsys.readouterr().err == f"error: {yaml_file}: {error.value}\n"
    assert str(error.value).startswith("invalid config: batch_size: ") and "\n" not in str(error.value)


def test_an_occupied_run_folder_is_refused_as_the_cli_refuses_it(run_folders):
    finished, _ = run_folders["finished"]
    with pytest.raises(RlhfTimeError, match="already holds a run .*resume_from_checkpoint=latest"):
        write_run_config({"model_name": "tiny", "train_file": str(TRAIN_FILE), "experiment_name": finished.name,
                          "output_dir": str(finished.parent)})
    with pytest.raises(RlhfTimeError, match="no config.yaml to resume from"):
        resume_config(finished.parent / "nowhere")


def test_resume_continues_the_stopped_runs_own_config_from_its_latest_checkpoint(run_folders, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(run_folders["interrupted"], stopped)
    saved = yaml.safe_load((stopped / "config.yaml").read_text(encoding="utf-8"))
    path = resume_config(stopped)
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == {**saved, "resume_from_checkpoint": "latest"}
    shutil.rmtree(stopped / "checkpoint-2"), shutil.rmtree(stopped / "checkpoint-3")
    with pytest.raises(RlhfTimeError, match="no checkpoint to resume from"):
        resume_config(stopped)


def test_a_run_that_fails_in_the_child_leaves_its_error_and_exit_code_in_the_run_folder(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(TRAIN_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    path = write_run_config({"model_name": str(tmp_path / "no-such-model"), "train_file": str(data),
                             "eval_file": str(EVAL_FILE), "output_dir": str(tmp_path / "out")})
    control = RunControl()
    process = control.start(path)
    assert control.alive() == {process.run_dir}  # Python takes seconds to import torch: still starting
    with pytest.raises(RlhfTimeError, match="already training"):
        control.start(path)
    deadline = time.monotonic() + 120
    while "exit code:" not in log_tail(process.run_dir):
        assert time.monotonic() < deadline, log_tail(process.run_dir)
        time.sleep(0.2)
    tail = log_tail(process.run_dir)
    assert tail.endswith("exit code: 2") and "error: " in tail and "no-such-model" in tail
    assert run_state(process.run_dir) == "failed" and (process.run_dir / LOG_FILE).is_file()
    assert not control.stop(process.run_dir)  # nothing left to stop
