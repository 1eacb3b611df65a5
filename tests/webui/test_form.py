"""The Train tab's form covers every config field and stage option, with the models' own help and defaults, and
turns what the user changed into the values the CLI would read from `key=value`."""

from __future__ import annotations

import json

from rlhf_time.config import TrainingConfig
from rlhf_time.data.quickstart import TRAIN_FILE
from rlhf_time.stages import SECTIONS
from rlhf_time.webui.form import FormField, data_preview, form_fields, form_values, stage_sections


def test_every_config_field_and_every_stage_option_has_one_input_with_its_help_and_default():
    fields = form_fields()
    names = [field.name for field in fields]
    shared = [name for name in TrainingConfig.model_fields if name not in SECTIONS]
    options = [f"{section}.{name}" for section, model in SECTIONS.items() for name in model.model_fields]
    assert sorted(names) == sorted(shared + options) and len(names) == len(set(names))
    for field in fields:
        section, dot, option = field.name.partition(".")
        info = SECTIONS[section].model_fields[option] if dot else TrainingConfig.model_fields[field.name]
        assert field.help == info.description and field.help, field.name
        assert field.default == info.get_default(call_default_factory=True), field.name
        assert field.group == (section if dot else field.group) and field.elem_id == field.name.replace(".", "-")
    stage = next(field for field in fields if field.name == "stage")
    assert stage.kind == "choice" and "sft" in stage.choices and "online_dpo" in stage.choices
    assert {field.kind for field in fields} == {"text", "checkbox", "choice"}


def test_an_untouched_form_writes_only_the_stage_and_defaults_read_back_as_defaults():
    fields = form_fields()
    assert form_values(fields, [field.default_value for field in fields]) == {"stage": "sft"}
    config = TrainingConfig(**form_values(fields, [field.default_value for field in fields]))
    assert config.model_dump() == TrainingConfig().model_dump()


def _inputs(fields: list[FormField], **changed) -> list:
    values = {field.name: field.default_value for field in fields}
    values.update({name.replace("__", "."): value for name, value in changed.items()})
    return [values[field.name] for field in fields]


def test_changed_inputs_are_typed_like_cli_overrides_and_other_stages_sections_are_left_out():
    fields = form_fields()
    values = form_values(fields, _inputs(fields, stage="dpo", batch_size="4", freeze_layers="[0, 1]",
                                         train_file="data.jsonl", use_lora=True, lr_scheduler_type="cosine",
                                         max_steps="30", dpo__beta="0.25", grpo__num_generations="4"))
    assert values == {"stage": "dpo", "batch_size": 4, "freeze_layers": [0, 1], "train_file": "data.jsonl",
                      "use_lora": True, "lr_scheduler_type": "cosine", "max_steps": 30, "dpo": {"beta": 0.25}}
    assert stage_sections("dpo") == ("dpo",) and stage_sections("grpo") == ("grpo", "rollout")
    # Clearing an optional field that has a value sets it to null, as `key=null` does.
    assert form_values(fields, _inputs(fields, lora_target_modules=""))["lora_target_modules"] is None


def test_data_preview_reads_the_first_records_and_detects_their_format():
    records, fmt = data_preview(str(TRAIN_FILE), count=3)
    expected = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:3]]
    assert (records, fmt) == (expected, "prompt_response")
