"""The Train tab's form, generated from the config models: one input per TrainingConfig field and per option of each
stage section, with the name, default and help text that `rlhf-time --help-config` shows (rlhf_time.config_docs).

A value is typed as a `key=value` override of the CLI is (config_yaml.typed_value), and only the fields the user
changed go into the run's YAML, so the library's defaults (and the stage's default experiment_name) still apply.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

import yaml

from rlhf_time.config import TrainingConfig
from rlhf_time.config_docs import Block, reference
from rlhf_time.config_yaml import typed_value
from rlhf_time.stages import SECTIONS, STAGES

# Fields shown above the option groups (the rest keep their place in their group). Names only: what each field
# means, its type and its default come from the config models.
PRIMARY_FIELDS = ("stage", "experiment_name", "model_name", "train_file", "eval_file", "max_steps", "batch_size",
                  "learning_rate", "use_lora")


@dataclass(frozen=True)
class FormField:
    name: str  # dotted for a section's option: dpo.beta
    group: str  # the config_docs block (shared fields) or the section name (a stage's options)
    annotation: Any
    default: Any
    help: str

    @property
    def section(self) -> Optional[str]:
        head, dot, _ = self.name.partition(".")
        return head if dot else None

    @property
    def elem_id(self) -> str:
        return self.name.replace(".", "-")

    @property
    def kind(self) -> str:
        """checkbox (bool), choice (one of a fixed list) or text (typed like a `key=value` override)."""
        if self.annotation is bool:
            return "checkbox"
        return "choice" if self.choices else "text"

    @property
    def choices(self) -> tuple[str, ...]:
        if self.name == "stage":
            return tuple(STAGES)
        if typing.get_origin(self.annotation) is Literal:
            return tuple(str(value) for value in typing.get_args(self.annotation))
        return ()

    @property
    def default_value(self) -> Any:
        """The default as the input shows it: a bool, a choice, or the text of a `key=value` override."""
        if self.kind != "text":
            return self.default
        return value_text(self.default)


def value_text(value: Any) -> str:
    """A field value as override text: '' for None, strings as they are, the rest as one line of YAML."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix("\n...")


def form_fields() -> list[FormField]:
    """Every shared field, then every option of every stage section, in the reference's order."""
    fields: list[FormField] = []
    for block in reference():
        fields += _block_fields(block, group=block.title)
    return fields


def _block_fields(block: Block, group: str) -> list[FormField]:
    fields = []
    for doc in block.fields:
        section, dot, option = doc.name.partition(".")
        info = SECTIONS[section].model_fields[option] if dot else TrainingConfig.model_fields[doc.name]
        fields.append(FormField(doc.name, section if dot else group, info.annotation,
                                info.get_default(call_default_factory=True), doc.help))
    for inner in block.blocks:
        fields += _block_fields(inner, group=inner.title)
    return fields


def stage_sections(stage: str) -> tuple[str, ...]:
    """The option sections a stage reads (its form shows only those)."""
    return STAGES[stage].sections if stage in STAGES else ()


def form_values(fields: list[FormField], inputs: list[Any]) -> dict[str, Any]:
    """The config values of the inputs the user changed: shared fields at the top, a section's options in a mapping
    under its name; sections the chosen stage does not read are left out."""
    by_name = dict(zip((field.name for field in fields), inputs))
    stage = by_name.get("stage") or "sft"
    values: dict[str, Any] = {}
    for field, given in zip(fields, inputs):
        if given is None and field.kind != "text":
            continue
        if field.kind == "text":
            given = "" if given is None else str(given).strip()
        if given == field.default_value or (field.section and field.section not in stage_sections(stage)):
            continue
        value = typed_value(field.annotation, given) if field.kind == "text" else given
        if value == "" and _takes_none(field.annotation):
            value = None
        if field.section:
            values.setdefault(field.section, {})[field.name.partition(".")[2]] = value
        else:
            values[field.name] = value
    if "stage" in by_name:
        values["stage"] = stage  # always written, so the YAML says what it trains
    return values


def _takes_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def data_preview(path: str, data_format: str = "auto", count: int = 5) -> tuple[list[dict[str, Any]], str]:
    """The first records of a data file or data set and the format the library detects in them."""
    from rlhf_time.data.formats import detect_format
    from rlhf_time.data.sources import record_chunks

    config = TrainingConfig(train_file=path, data_format=data_format)
    _, chunks = record_chunks(path, config, "train", limit=count)
    records = next(chunks, [])
    if not records:
        return [], ""
    return [record.data for record in records], detect_format(records[0], data_format)
