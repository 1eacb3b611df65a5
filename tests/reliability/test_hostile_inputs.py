"""Hostile inputs of issue 27: each ends as one line naming the field or path and its real cause (exit code 2, no
traceback), and a model that is not what the config says is refused before it trains or scores."""

import json

import pytest

from rlhf_time.cli import main
from rlhf_time.config import ConfigError, TrainingConfig

from .test_error_contract import _config, one_error_line

PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, shown", [
    ("reward_weights", "[.nan]", "reward_weights"), ("mix_weights", "[1.0, .inf]", "mix_weights")])
def test_every_number_in_the_config_is_finite_nested_too(tmp_path, tiny_model_dir, capsys, field, value, shown):
    extra = ({"reward_funcs": ["exact_match"], "stage": "grpo"} if field == "reward_weights"
             else {"train_file": [str(_jsonl(tmp_path / "a.jsonl", PAIRS))] * 2, "data_format": "auto"})
    path = _config(tmp_path, tiny_model_dir, **extra)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{field}: {value}\n")
    line = one_error_line(capsys, ["train", path])
    assert shown in line and "finite" in line


def test_a_config_error_found_on_assignment_names_the_reason_not_the_whole_config():
    config = TrainingConfig(use_lora=True)
    with pytest.raises(ConfigError) as caught:
        config.freeze_layers = [0]
    message = str(caught.value)
    assert "freeze_layers" in message and "use_lora" in message
    assert "TrainingConfig(" not in message and len(message) < 300


@pytest.mark.parametrize("stage, data_format, fix", [("sft", "preference", "stage rm or dpo"),
                                                     ("dpo", "prompt_response", "data_format: preference")])
def test_a_data_format_that_does_not_suit_the_stage_says_so(tmp_path, tiny_model_dir, capsys, stage, data_format, fix):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    line = one_error_line(capsys, ["train", _config(tmp_path, tiny_model_dir, train_file=data, stage=stage,
                                                    data_format=data_format)])
    assert f"data_format {data_format} does not suit stage '{stage}'" in line and fix in line


# ------------------------------------------------------------------------------------------ commands
@pytest.mark.parametrize("command, needed", [("eval", "CONFIG_YAML"), ("predict", "MODEL_DIR"), ("chat", "MODEL_DIR")])
def test_a_command_without_arguments_names_what_it_needs(capsys, command, needed):
    with pytest.raises(SystemExit) as exit_code:
        main([command])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "Traceback" not in err
    assert needed in err.splitlines()[-1] and "overrides" not in err.splitlines()[-1]


def test_export_of_a_missing_folder_says_not_found(tmp_path, capsys):
    line = one_error_line(capsys, ["export", str(tmp_path / "runs" / "nope" / "final"), str(tmp_path / "merged")])
    assert "runs/nope/final" in line and "not found" in line and "not a LoRA" not in line
