"""ConfigError and the wording of its messages: unknown keys (with close matches, and the new place of a key that
moved into a section) and pydantic's validation errors, each as one line."""

from __future__ import annotations

import difflib
from typing import Iterable

from pydantic import BaseModel, ValidationError

from rlhf_time.errors import RlhfTimeError
from rlhf_time.stages import SECTIONS, STAGES


class ConfigError(RlhfTimeError, ValueError):
    """A config value is wrong: the message names the field and what is allowed."""


def unknown_keys_message(keys: list[str], fields: Iterable[str], stage: str = "sft") -> str:
    """One line for keys that are not fields: a key that moved into a section names its new place.

    fields: the config's own field names (the sections' options are added here as `section.option`).
    """
    fields = list(fields) + [f"{name}.{field}" for name, section in SECTIONS.items() for field in section.model_fields]
    parts = []
    for key in keys:
        moved = _new_places(key, stage)
        if moved:
            parts.append(f"{key} is now {' or '.join(moved)}")
            continue
        section, dot, name = key.partition(".")
        if dot and section in SECTIONS:  # a misspelt option of a known section: suggest that section's options
            close = [f"{section}.{match}" for match in
                     difflib.get_close_matches(name, list(SECTIONS[section].model_fields), n=3)]
            parts.append(f"unknown option {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            continue
        close = difflib.get_close_matches(key, fields, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"unknown config key {key!r}{hint}")
    return "; ".join(parts) + ". Run `rlhf-time train --help-config` for the list of fields."


def _new_places(key: str, stage: str) -> list[str]:
    """The section fields a former flat key moved to; the run's own section first when several took it (kl_coef)."""
    places = [f"{name}.{section.former_names[key]}" for name, section in SECTIONS.items() if key in section.former_names]
    own = [place for place in places if place.partition(".")[0] in STAGES.get(stage, STAGES["sft"]).sections]
    return own or places


def validation_message(error: ValidationError) -> str:
    """pydantic's errors as one line: each names its field (`dpo.beta`) and the value it got."""
    parts = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "extra_forbidden" and len(item["loc"]) == 2:  # a key inside a section
            name, key = (str(part) for part in item["loc"])
            close = [f"{name}.{match}" for match in difflib.get_close_matches(key, list(SECTIONS[name].model_fields), n=3)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parts.append(f"unknown option {field!r}{hint}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        # A model validator's input is the whole config (~3 KB): its message already names the fields.
        shown = "" if isinstance(got, (dict, BaseModel)) else f" (got {got!r})"
        parts.append(f"{field}: {message}{shown}")
    return "invalid config: " + "; ".join(parts)
