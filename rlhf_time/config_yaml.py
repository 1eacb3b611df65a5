"""YAML as plain values, before the config's schema checks them: a config file's mapping (errors name the file and
line), its data and model paths made relative to the file, and the value of one `key=value` override."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_time.config_errors import ConfigError
from rlhf_time.user_functions import resolve_function_file


def read_yaml_mapping(path: Path) -> dict[Any, Any]:
    """The mapping a YAML config file holds (safe loader); ConfigError when it is missing, not YAML or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line, whatever yaml says
        raise ConfigError(f"{path}:{where} invalid YAML ({problem})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if values is None:  # an empty file would otherwise silently mean "all defaults" (an 8B download)
        raise ConfigError(f"{path}: empty config; set at least model_name and train_file")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


# Data and model paths a YAML file may give relative to itself: shared fields, then (section, field) pairs.
YAML_RELATIVE_FIELDS = ("train_file", "eval_file", "model_name")
YAML_RELATIVE_SECTION_FIELDS = (("rollout", "reward_model"), ("ppo", "value_model"), ("dpo", "ref_model"),
                                ("kd", "teacher_model"), ("kd", "teacher_adapter"))


def resolve_relative_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative data/model paths written in a YAML file name files next to that YAML (so examples run from any
    working directory), as do function files (`rewards.py:function` in reward_funcs and tools, `env.py:Class` as rollout.environment); a path that does not
    exist there is left as written (relative to the working directory)."""

    def resolve(path: Any) -> Any:
        if isinstance(path, str) and path and not Path(path).is_absolute() and (folder / path).exists():
            return os.path.normpath(folder / path)
        return path

    values = dict(values)
    for key in YAML_RELATIVE_FIELDS:
        if key in values:
            value = values[key]
            values[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    for section, key in YAML_RELATIVE_SECTION_FIELDS:
        if isinstance(values.get(section), dict) and key in values[section]:
            values[section] = {**values[section], key: resolve(values[section][key])}
    rollout = values.get("rollout")
    if isinstance(rollout, dict) and isinstance(rollout.get("reward_funcs"), list):
        values["rollout"] = {**rollout, "reward_funcs": [resolve_function_file(spec, folder) for spec in rollout["reward_funcs"]]}
    if isinstance(values.get("rollout"), dict) and "environment" in values["rollout"]:
        values["rollout"] = {**values["rollout"],
                             "environment": resolve_function_file(values["rollout"]["environment"], folder)}
    if isinstance(values.get("tools"), list):
        values["tools"] = [resolve_function_file(spec, folder) for spec in values["tools"]]
    return values


def typed_value(annotation: Any, raw: str) -> Any:
    """The value of `key=raw` for a field of this type: YAML-typed, except that strings stay strings for str fields."""
    wants_str = annotation is str or (typing.get_origin(annotation) is typing.Union and str in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:  # e.g. report_to=none stays the string "none"
        return raw
    if raw.strip().lower() in ("null", "none", "~"):
        return None
    takes_list = any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))
    if wants_str and not (takes_list and raw.lstrip().startswith("[")):  # train_file=[a.jsonl,b.parquet] is a list
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
