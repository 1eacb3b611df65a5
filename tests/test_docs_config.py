"""The configuration reference is generated from the config models: docs/configuration.md and `--help-config`
say the same, list every field with a help text, and keep working when a stage's options become a nested model."""

from pathlib import Path
from typing import Optional

import pytest
from pydantic import BaseModel, Field

from rlhf_time import TrainingConfig
from rlhf_time.cli import main
from rlhf_time.config_docs import REGENERATE, render_markdown, render_text

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


def _all_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted name, FieldInfo) of every field, descending into fields whose type is a pydantic model."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        inner = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)
                 and issubclass(a, BaseModel)]
        if inner:
            yield from _all_fields(inner[0], f"{prefix}{name}.")
        else:
            yield prefix + name, info


def test_the_configuration_page_is_the_generators_output():
    assert PAGE.read_text(encoding="utf-8") == render_markdown(), (
        f"docs/configuration.md is out of date with the config models; regenerate it: {REGENERATE}")


def test_every_field_is_in_the_reference_with_a_help_text():
    page = PAGE.read_text(encoding="utf-8")
    fields = list(_all_fields(TrainingConfig))
    assert len(fields) > 100 and len(fields) >= len(TrainingConfig.model_fields)
    assert [name for name, info in fields if not (info.description or "").strip()] == []
    assert [name for name, _ in fields if f"| `{name}` |" not in page] == []


def test_help_config_prints_the_same_reference_as_text(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help-config"])
    assert stop.value.code == 0
    top_level = capsys.readouterr().out
    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == top_level == render_text()
    for name, info in _all_fields(TrainingConfig):
        default = info.get_default(call_default_factory=True)
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        assert f"{name}: " in top_level and f" = {shown}\n    {info.description}\n" in top_level, name


class _Sampling(BaseModel):
    # --- sampling -----------------------------------------------------------------------------------
    num_generations: int = Field(8, description="Completions sampled per prompt.")
    temperature: float = Field(0.7, description="Sampling temperature.")


class _Config(BaseModel):
    # --- run ----------------------------------------------------------------------------------------
    seed: int = Field(42, description="Seed of everything.")
    # --- stage options --------------------------------------------------------------------------------
    grpo: _Sampling = Field(default_factory=_Sampling, description="GRPO's own options.")
    ppo: Optional[_Sampling] = Field(None, description="PPO's own options.")


def test_a_field_whose_type_is_a_model_is_rendered_as_its_own_block():
    page = render_markdown(_Config)
    assert "## Run\n" in page and "## Stage options\n" in page
    assert page.index("## Run") < page.index("| `seed` | int | `42` | Seed of everything. |") < page.index("## Stage")
    grpo = page.index("### `grpo`\n\nGRPO's own options.")
    ppo = page.index("### `ppo`\n\nPPO's own options.")
    assert grpo < page.index("| `grpo.num_generations` | int | `8` | Completions sampled per prompt. |") < ppo
    assert ppo < page.index("| `ppo.temperature` | float | `0.7` | Sampling temperature. |")
    text = render_text(_Config)
    assert "== stage options ==\n-- grpo --\n    GRPO's own options.\ngrpo.num_generations: int = 8\n" in text
    assert "ppo.temperature: float = 0.7\n    Sampling temperature.\n" in text
