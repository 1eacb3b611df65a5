"""Stage options live in sections named after their stage (rollout: shared by GRPO and PPO). Every way of setting
one (Python dict or class, YAML mapping, CLI dotted override) gives the same config; an old flat key names its new
place; a section of another stage is refused; defaults are the sections' own (PPO's kl_coef 0.05, GRPO's 0)."""

import pytest
import yaml

from rlhf_time import TrainingConfig
from rlhf_time.cli import main
from rlhf_time.config import ConfigError, parse_overrides
from rlhf_time.stages import SECTIONS, STAGES
from rlhf_time.stages.grpo_options import GRPOOptions
from rlhf_time.stages.ppo_options import PPOOptions

# The names scripts may rely on (issue 21): each must exist with this spelling.
FIXED_NAMES = ["kd.teacher_model", "kd.alpha", "kd.temperature", "kd.loss_type", "kd.beta", "dpo.beta",
               "dpo.loss_type", "grpo.num_generations", "ppo.gamma", "ppo.lam", "ppo.kl_coef"]


@pytest.mark.parametrize("name", FIXED_NAMES)
def test_the_documented_names_exist(name):
    section, field = name.split(".")
    assert field in SECTIONS[section].model_fields


def test_every_form_gives_the_same_config(tmp_path):
    as_dict = TrainingConfig(stage="grpo", grpo={"num_generations": 4, "kl_coef": 0.04})
    as_class = TrainingConfig(stage="grpo", grpo=GRPOOptions(num_generations=4, kl_coef=0.04))
    path = tmp_path / "grpo.yaml"
    path.write_text("stage: grpo\ngrpo:\n  num_generations: 4\n  kl_coef: 0.04\n", encoding="utf-8")
    from_yaml = TrainingConfig.from_yaml(path)
    from_cli = TrainingConfig(**parse_overrides(["stage=grpo", "grpo.num_generations=4", "grpo.kl_coef=0.04"]))
    yaml_then_cli = TrainingConfig.from_yaml(path, ["grpo.num_generations=6"])
    for config in (as_dict, as_class, from_yaml, from_cli):
        assert config.grpo.num_generations == 4 and config.grpo.kl_coef == 0.04
        assert config.model_dump() == as_dict.model_dump()
    assert yaml_then_cli.grpo.num_generations == 6 and yaml_then_cli.grpo.kl_coef == 0.04  # merged, not replaced
    assert isinstance(parse_overrides(["grpo.num_generations=8"])["grpo"]["num_generations"], int)


def test_a_section_value_is_validated_on_construction_and_assignment():
    with pytest.raises(ConfigError, match=r"grpo.num_generations"):
        TrainingConfig(stage="grpo", grpo={"num_generations": 0})
    with pytest.raises(ConfigError, match=r"unknown option 'grpo.num_generation'.*num_generations"):
        TrainingConfig(stage="grpo", grpo={"num_generation": 8})
    config = TrainingConfig(stage="grpo")
    with pytest.raises(Exception, match="num_generations"):
        config.grpo.num_generations = -1
    with pytest.raises(ConfigError, match=r"ppo\.gamma"):
        TrainingConfig(stage="ppo", ppo={"gamma": float("nan")})
    with pytest.raises(ConfigError, match=r"rollout\.reward_weights.*finite"):
        TrainingConfig(stage="grpo", rollout={"reward_weights": [1.0, float("inf")]})


@pytest.mark.parametrize("key, value, place", [
    ("num_generations", 8, "grpo.num_generations"), ("kd_alpha", 0.0, "kd.alpha"), ("beta", 0.1, "dpo.beta"),
    ("ppo_epochs", 2, "ppo.epochs"), ("reward_funcs", ["exact_match"], "rollout.reward_funcs"),
    ("reward_margin", 0.0, "rm.margin")])
def test_an_old_flat_key_names_its_new_place(key, value, place):
    with pytest.raises(ConfigError, match=rf"^{key} is now {place}"):
        TrainingConfig(**{key: value})


def test_kl_coef_names_the_section_of_the_runs_stage():
    with pytest.raises(ConfigError, match=r"kl_coef is now ppo\.kl_coef"):
        TrainingConfig(stage="ppo", kl_coef=0.1)
    with pytest.raises(ConfigError, match=r"kl_coef is now grpo\.kl_coef"):
        TrainingConfig(stage="grpo", kl_coef=0.1)


def test_an_old_key_in_yaml_and_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"stage": "grpo", "model_name": "tiny", "train_file": "x.jsonl",
                                    "num_generations": 8}), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "num_generations is now grpo.num_generations" in err and "Traceback" not in err
    assert main(["train", "model_name=tiny", "train_file=x.jsonl", "kd_alpha=0"]) == 2
    assert "kd_alpha is now kd.alpha" in capsys.readouterr().err


@pytest.mark.parametrize("stage, section", [("sft", "grpo"), ("grpo", "ppo"), ("dpo", "kd"), ("rm", "rollout")])
def test_a_section_of_another_stage_is_refused(stage, section):
    with pytest.raises(ConfigError, match=rf"section '{section}' holds options of stage .* not of this run's stage "
                                          rf"'{stage}'"):
        TrainingConfig(stage=stage, **{section: {}})


def test_each_stage_reads_its_own_sections_and_the_defaults_are_the_sections():
    assert STAGES["grpo"].sections == ("grpo", "rollout") and STAGES["ppo"].sections == ("ppo", "rollout")
    assert TrainingConfig(stage="ppo").ppo.kl_coef == 0.05 == PPOOptions().kl_coef
    assert TrainingConfig(stage="grpo").grpo.kl_coef == 0.0


def test_a_saved_config_holds_only_the_runs_sections_and_reloads_equal(tmp_path):
    config = TrainingConfig(stage="ppo", ppo={"epochs": 2}, rollout={"reward_funcs": ["exact_match"]})
    saved = config.to_dict()
    assert {"ppo", "rollout"} <= set(saved) and not {"grpo", "dpo", "kd", "rm"} & set(saved)
    assert list(saved)[-2:] == ["ppo", "rollout"]  # the shared fields first
    config.to_yaml(tmp_path / "config.yaml")
    assert TrainingConfig.from_yaml(tmp_path / "config.yaml").model_dump() == config.model_dump()


def test_a_whole_section_on_the_command_line_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"grpo is a section: set its options one by one, e.g. grpo\."):
        parse_overrides(["grpo=8"])
    with pytest.raises(ConfigError, match=r"unknown option 'grpo.nope'"):
        parse_overrides(["grpo.nope=1"])
