"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing anchor or a page left out
of the navigation fails the suite."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a build warning
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(project / "mkdocs.yml"), "--site-dir", str(site)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_site_builds_strictly(tmp_path):
    result = _build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-4000:]
    for page in ("index", "stages", "data", "models", "multi-gpu", "speed", "configuration", "reliability", "cli",
                 "losses"):
        assert (tmp_path / "site" / (page if page != "index" else "") / "index.html").exists(), page


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "faq.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the stages](stages.md#no-such-heading).\n",
                    encoding="utf-8")
    result = _build(tmp_path, tmp_path / "site")
    assert result.returncode != 0 and "no-such-heading" in result.stderr
