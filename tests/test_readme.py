"""The README stays true: every config field is documented, and CI runs the README's test command."""

from pathlib import Path

from rlhf_time import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in TrainingConfig.model_fields if f"`{name}`" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.endswith("python -m pytest tests"))
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
