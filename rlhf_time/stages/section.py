"""The base of every stage's option section: a typed pydantic model with a help text on each field.

A section is a field of TrainingConfig named after its stage (`dpo`, `grpo`, ...) and is set as a mapping in
Python, YAML or CLI (`grpo.num_generations=8`). `former_names` lists the flat config keys the section replaced, so
an old key fails with one line naming its new place.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator


def option(default: Any, help: str, **constraints: Any) -> Any:
    """A section field: its default, its help text (shown by --help-config and the docs) and its constraints."""
    return Field(default, description=help, **constraints)


class Section(BaseModel):
    """Options owned by one stage (or shared by a few). Unknown keys, wrong types and non-finite numbers fail."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    former_names: ClassVar[dict[str, str]] = {}  # flat key of the config before sections -> field of this section

    @field_validator("*")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
            raise ValueError("must be a finite number")
        return value
