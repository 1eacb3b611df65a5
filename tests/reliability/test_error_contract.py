"""Failures users meet end as one line naming the path/field and its cause, exit code 2, no traceback."""

import json
import shutil
import time

import pytest
import torch
import yaml

from rlhf_time.cli import main
from rlhf_time.data.quickstart import TRAIN_FILE


def _config(tmp_path, model_dir, **values):
    base = dict(model_name=str(model_dir), output_dir=str(tmp_path / "out"), experiment_name="run", batch_size=4,
                max_steps=1, report_to="none", disable_progress_bar=True, save_strategy="no", eval_strategy="no",
                max_seq_length=48, max_train_samples=8, train_file=str(TRAIN_FILE),
                data_cache_dir=str(tmp_path / "cache"))
    base.update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    return str(path)


def one_error_line(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line and no traceback. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- config
def test_empty_yaml_is_an_error_not_all_defaults(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    line = one_error_line(capsys, ["train", str(path)])
    assert "empty.yaml" in line and "empty config" in line


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "..", "x\\y"])
def test_experiment_name_must_stay_inside_output_dir(tmp_path, tiny_model_dir, capsys, name):
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, experiment_name=name)])
    assert "experiment_name" in line
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("setting", [dict(eval_strategy="steps"), dict(early_stopping_patience=2),
                                     dict(metric_for_best_model="eval_accuracy")])
def test_evaluation_settings_without_eval_file_are_an_error(tmp_path, tiny_model_dir, capsys, setting):
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, **setting)])
    assert next(iter(setting)) in line and "eval_file" in line


def test_device_must_exist(tmp_path, tiny_model_dir, capsys, monkeypatch):
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir), "device=banana"])
    assert "device" in line and "cuda:N" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir), "device=cuda"])
    assert "device" in line and "CUDA is not available" in line


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_is_an_error(tmp_path, tiny_model_dir, capsys, nproc):
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir), "--nproc", nproc])
    assert "--nproc" in line


# --------------------------------------------------------------------------------------------- data
def test_a_directory_as_train_file_says_so(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, train_file=str(folder))])
    # A folder is a datasets folder since issue 15: an empty one says it holds no data files.
    assert str(folder) in line and "directory" in line and "data files" in line


def test_csv_with_an_unterminated_quote_names_the_row_where_it_opened(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "train.csv"
    data.write_text('prompt,response\nhi,there\n"open,quote\nnext,row\nlast,row\n', encoding="utf-8")
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, train_file=str(data))])
    assert "train.csv row 3" in line and "quote" in line


# -------------------------------------------------------------------------------------- model folders
def test_truncated_safetensors_is_one_line(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_error_line(capsys, ["train", _config(tmp_path, folder)])
    assert str(folder) in line and "truncated or corrupt" in line


def test_model_folder_without_tokenizer_says_the_tokenizer_is_missing(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for file in folder.iterdir():
        if file.name.startswith("tokenizer") or file.suffix == ".jinja":
            file.unlink()
    line = one_error_line(capsys, ["train", _config(tmp_path, folder)])
    assert str(folder) in line and "tokenizer" in line and "no target" not in line


def test_score_refuses_a_folder_that_is_not_a_reward_model(tmp_path, tiny_model_dir, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n", encoding="utf-8")
    output = tmp_path / "scores.jsonl"
    line = one_error_line(capsys, ["score", str(tiny_model_dir), "--input", str(source), "--output", str(output)])
    assert "not a reward model" in line and "stage=rm" in line
    assert not output.exists()


def test_score_on_a_missing_local_folder_fails_at_once(tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n", encoding="utf-8")
    start = time.monotonic()
    line = one_error_line(capsys, ["score", str(tmp_path / "no-such-rm"), "--input", str(source),
                                   "--output", str(tmp_path / "s.jsonl")])
    assert "no-such-rm" in line and "not found" in line
    assert time.monotonic() - start < 5  # no hub retries for a path that is simply wrong


# ------------------------------------------------------------------------------------------- output
def test_output_dir_that_is_a_file(tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("I am a file", encoding="utf-8")
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir)])
    assert str(blocker) in line and "is a file" in line


def test_predict_with_a_missing_local_model_folder_fails_at_once(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-8")
    start = time.monotonic()
    line = one_error_line(capsys, ["predict", str(tmp_path / "outputs" / "run" / "final"), "--input", str(prompts),
                                   "--output", str(tmp_path / "p.jsonl")])
    assert "outputs/run/final" in line and "not found" in line
    assert time.monotonic() - start < 5
