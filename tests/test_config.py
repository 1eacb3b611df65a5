"""TrainingConfig: the original defaults, one clear error per bad value, YAML round trip, typed overrides."""

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.config import ConfigError, parse_overrides

ORIGINAL_DEFAULTS = dict(
    experiment_name="sft_experiment", model_name="Qwen/Qwen3-8B", model_type="Qwen", device=None, batch_size=8,
    learning_rate=2e-5, num_train_epochs=3, max_seq_length=2048, gradient_accumulation_steps=1, warmup_steps_ratio=0.1,
    use_lora=False, lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"],
    freeze_layers=None, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
    prompt_template=None, response_template=None, use_gradient_checkpointing=False, use_amp=False,
)


def test_original_defaults_are_kept():
    config = TrainingConfig()
    for name, value in ORIGINAL_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.shuffle is True and config.group_by_length is True and config.stage == "sft"


def test_keyword_construction_as_users_write_it():
    config = TrainingConfig(experiment_name="my_sft_experiment", model_name="Qwen/Qwen3-8B", model_type="Qwen",
                            train_file="data/train.jsonl", eval_file="data/eval.jsonl", batch_size=4,
                            learning_rate=2e-5, num_train_epochs=3)
    assert config.batch_size == 4 and config.run_dir.name == "my_sft_experiment"


@pytest.mark.parametrize(
    "values, words",
    [
        (dict(batch_size=0), ["batch_size", "greater than 0"]),
        (dict(batch_size="eight"), ["batch_size", "integer"]),
        (dict(lora_dropout=1.0), ["lora_dropout", "less than 1"]),
        (dict(lora_dropout=-0.1), ["lora_dropout", "greater than or equal to 0"]),
        (dict(lr_scheduler_type="poly"), ["lr_scheduler_type", "'linear', 'cosine' or 'constant'"]),
        (dict(model_type="gpt"), ["model_type", "Qwen, Llama"]),
        (dict(prompt_template="no placeholder"), ["prompt_template", "{prompt}"]),
        (dict(response_template="no placeholder"), ["response_template", "{response}"]),
        (dict(eval_strategy="sometimes"), ["eval_strategy", "'no', 'steps' or 'epoch'"]),
        (dict(learning_rate=-1), ["learning_rate"]),
        (dict(warmup_steps_ratio=1.5), ["warmup_steps_ratio"]),
        (dict(freeze_layers=[-1]), ["freeze_layers", ">= 0"]),
        (dict(use_lora=True, freeze_layers=[0]), ["use_lora", "freeze_layers"]),
        (dict(batchsize=4), ["unknown config key 'batchsize'", "batch_size"]),
    ],
)
def test_each_bad_value_names_field_and_allowed_values(values, words):
    with pytest.raises(ConfigError) as error:
        TrainingConfig(**values)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_model_type_is_case_insensitive():
    assert TrainingConfig(model_type="llama").model_type == "Llama"
    assert TrainingConfig(model_type="QWEN").model_type == "Qwen"


def test_assignment_is_validated():
    config = TrainingConfig()
    with pytest.raises(ConfigError, match="batch_size"):
        config.batch_size = -3
    with pytest.raises(ConfigError, match="unknown config key"):
        config.not_a_field = 1


def test_yaml_round_trip_and_overrides(tmp_path):
    config = TrainingConfig(experiment_name="中文实验", freeze_layers=[0, 1], prompt_template="请回答以下问题：{prompt}")
    path = tmp_path / "config.yaml"
    config.to_yaml(path)
    assert TrainingConfig.from_yaml(path) == config
    loaded = TrainingConfig.from_yaml(path, ["batch_size=4", "learning_rate=1e-4", "use_lora=true", "freeze_layers=null",
                                             "experiment_name=123"])
    assert (loaded.batch_size, loaded.learning_rate, loaded.use_lora, loaded.freeze_layers) == (4, 1e-4, True, None)
    assert loaded.experiment_name == "123"


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        TrainingConfig.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: invalid config: batch_size"):
        TrainingConfig.from_yaml(wrong)
    with pytest.raises(ConfigError, match="not found"):
        TrainingConfig.from_yaml(tmp_path / "missing.yaml")


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("experiment_name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        TrainingConfig.from_yaml(evil)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["batch_size"])
    with pytest.raises(ConfigError, match="unknown config key 'btach_size'"):
        parse_overrides(["btach_size=3"])


def test_paths_in_a_yaml_name_files_next_to_it_when_they_exist_there(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "data").mkdir(parents=True)
    for name in ("data/a.jsonl", "data/b.jsonl", "rewards.py"):
        (folder / name).write_text("", encoding="utf-8")
    (folder / "rm").mkdir()
    (folder / "run.yaml").write_text(
        "model_name: tiny\nstage: grpo\ntrain_file: [data/a.jsonl, data/b.jsonl]\nmix_weights: [0.5, 0.5]\n"
        "rollout:\n  reward_model: rm\n  reward_funcs: [rewards.py:score, exact_match, my_pkg.rewards:fn, other.py:f]\n",
        encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # elsewhere: the YAML's own folder decides
    config = TrainingConfig.from_yaml(folder / "run.yaml")
    assert config.train_file == [str(folder / "data/a.jsonl"), str(folder / "data/b.jsonl")]
    assert config.rollout.reward_model == str(folder / "rm")
    assert config.rollout.reward_funcs == [f"{folder / 'rewards.py'}:score", "exact_match", "my_pkg.rewards:fn",
                                           "other.py:f"]
    assert "value_model" not in config.ppo.model_fields_set and config.ppo.value_model is None  # absent keys stay absent
