"""The README stays short and true: CI runs its test command, it fits in 350 lines, and its links lead somewhere.

(Every config field is documented in the generated reference: tests/test_docs_config.py. Every code block and
command of the README runs: tests/test_docs_blocks.py.)"""

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_ci_runs_the_readme_test_command():
    readme = README.read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.endswith("python -m pytest tests"))
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_is_at_most_350_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 350


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", markdown.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {github_anchor(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_relative_link_in_the_readme_points_to_an_existing_file_and_heading():
    broken = []
    for target in LINK.findall(README.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {path or 'README.md'}")
    assert broken == []


def test_the_link_check_sees_a_broken_link():
    assert github_anchor("Streaming (`streaming: true`)") == "streaming-streaming-true"
    assert "rlhf-in-three-commands" in _anchors(ROOT / "docs" / "stages.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "stages.md")
