"""Property-based fuzzing of everything that parses user input: the record readers and formats, prompts for
predict, the YAML config and the key=value overrides. The only outcomes allowed are success or the project's
one-line error (RlhfTimeError, single line); any other exception is a bug."""

import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_time.config import TrainingConfig, parse_overrides
from rlhf_time.data import read_prompts, validate_data_file
from rlhf_time.errors import RlhfTimeError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SFT = TrainingConfig(stage="sft")


def _as_pairs(path, config=SFT):
    validate_data_file(path, config, kind="preference")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["prompt", "response", "messages", "conversations", "instruction", "input", "output", "chosen", "rejected",
          "margin", "system", "role", "content", "from", "value", "history"]
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool", "x"])
                                              | json_values, "content": st.text(max_size=10) | json_values,
                                              "from": st.sampled_from(["human", "gpt"]), "value": st.text(max_size=10)})
field_value = json_values | st.lists(message, max_size=4) | st.text(max_size=20)
records = st.lists(st.dictionaries(st.sampled_from(FIELDS), field_value, max_size=5), min_size=0, max_size=4)


def _only_clean_errors(action, *args):
    try:
        action(*args)
    except RlhfTimeError as error:
        assert "\n" not in str(error).strip(), repr(str(error))


def _write(suffix: str, content: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / f"data{suffix}"
    path.write_bytes(content)
    return path


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_random_bytes_in_a_data_file(content, suffix):
    path = _write(suffix, content)
    _only_clean_errors(read_prompts, path)
    if suffix != ".txt":
        _only_clean_errors(validate_data_file, path, SFT)


@FUZZ
@given(values=st.lists(json_values, max_size=4), as_lines=st.booleans())
def test_random_json_values_as_records(values, as_lines):
    content = "".join(json.dumps(v) + "\n" for v in values) if as_lines else json.dumps(values)
    path = _write(".jsonl" if as_lines else ".json", content.encode())
    for config in (SFT,):
        _only_clean_errors(validate_data_file, path, config)
        _only_clean_errors(_as_pairs, path, config)
    _only_clean_errors(read_prompts, path)


@FUZZ
@given(rows=records, data_format=st.sampled_from(["auto", "prompt_response", "messages", "alpaca", "sharegpt"]))
def test_random_field_types_in_known_fields(rows, data_format):
    path = _write(".jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    _only_clean_errors(validate_data_file, path, TrainingConfig(data_format=data_format))
    _only_clean_errors(_as_pairs, path)
    _only_clean_errors(read_prompts, path)


@FUZZ
@given(rows=st.lists(st.lists(st.text(alphabet=string.printable, max_size=8), min_size=1, max_size=4), max_size=5),
       header=st.lists(st.sampled_from(FIELDS + ["", " prompt", "x"]), min_size=1, max_size=4))
def test_random_csv(rows, header):
    text = "\n".join(",".join(cells) for cells in [header, *rows])
    path = _write(".csv", text.encode())
    _only_clean_errors(validate_data_file, path, SFT)
    _only_clean_errors(_as_pairs, path)


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
config_values = st.dictionaries(st.sampled_from(list(TrainingConfig.model_fields)) | st.text(max_size=10),
                                yaml_scalars | st.lists(yaml_scalars, max_size=3), max_size=5)


@FUZZ
@given(text=st.text(max_size=120) | config_values.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
def test_random_yaml_config(text):
    path = _write(".yaml", text.encode())
    _only_clean_errors(TrainingConfig.from_yaml, path)


@FUZZ
@given(values=config_values)
def test_random_config_values(values):
    _only_clean_errors(lambda: TrainingConfig(**values))


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(list(TrainingConfig.model_fields)) | st.text(max_size=8),
                                st.sampled_from(["=", "", "=="]), st.text(max_size=16)), max_size=4))
def test_random_overrides(pairs):
    items = [f"{key}{sep}{value}" for key, sep, value in pairs]
    _only_clean_errors(lambda: TrainingConfig(**parse_overrides(items)))
