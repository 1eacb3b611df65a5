"""The run folders under an output dir, as the Runs tab lists them: stage, model, steps, best metric and state.

Everything is read from the folder itself, so runs started from the CLI are listed like the page's own:
running (the training process holds the folder's lock), finished (final/ is there), interrupted (a checkpoint but
no final model: stopped, or killed after a checkpoint) or failed (the run ended with an error, or left neither).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf_time.errors import RlhfTimeError
from rlhf_time.plots import Series, chart_data, draw_charts, read_metrics
from rlhf_time.runtime.run_folder import LOCK_FILE

LOG_FILE = "webui.log"  # the output of a run the page started (the CLI's runs print to their terminal)
EXIT_LINE = re.compile(r"^exit code: (-?\d+)$")  # the page's last line of LOG_FILE when the process ends
STATES = ("running", "finished", "interrupted", "failed")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class RunInfo:
    name: str
    path: Path
    stage: str
    model: str
    step: int
    best_metric: str  # "eval_loss 0.123", or "" before the first evaluation
    state: str

    def row(self) -> list[Any]:
        return [self.name, self.stage, self.model, self.step, self.best_metric, self.state]


def list_runs(output_dir: str | Path, alive: frozenset[Path] = frozenset()) -> list[RunInfo]:
    """Every run folder under output_dir (a folder holding config.yaml, metrics.jsonl or a checkpoint), newest first.

    alive: run folders whose process the caller knows is still running (it may not hold the lock yet).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    folders = [path for path in root.iterdir() if path.is_dir() and is_run_folder(path)]
    folders.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    return [run_info(path, running=path.resolve() in alive) for path in folders]


def is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.yaml", "metrics.jsonl", LOG_FILE)) or \
        any(path.glob("checkpoint-*"))


def run_info(run_dir: Path, running: bool = False) -> RunInfo:
    config = run_config(run_dir)
    rows = metrics_rows(run_dir)
    steps = [int(row["step"]) for row in rows if "step" in row]
    return RunInfo(run_dir.name, run_dir, str(config.get("stage", "sft")), str(config.get("model_name", "")),
                   max(steps, default=0), best_metric(rows, config), run_state(run_dir, running))


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping ({} when missing or unreadable)."""
    try:
        values = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; [] before the first log line (or while a line is half written)."""
    try:
        return read_metrics(run_dir)
    except RlhfTimeError:
        return []


def best_metric(rows: list[dict], config: dict[str, Any]) -> str:
    """The best value of the run's metric_for_best_model so far, as `name value`."""
    name = str(config.get("metric_for_best_model") or "eval_loss")
    key = name if "/" in name else "eval/" + name.removeprefix("eval_")
    values = [float(row[key]) for row in rows if key in row]
    if not values:
        return ""
    greater = config.get("greater_is_better")
    greater = not any(word in name for word in ("loss", "perplexity")) if greater is None else greater
    return f"{name} {(max if greater else min)(values):.4g}"


def run_state(run_dir: Path, running: bool = False) -> str:
    """running, finished, interrupted or failed (see the module docstring)."""
    if running or lock_is_held(run_dir / LOCK_FILE):
        return "running"
    exit_code = logged_exit_code(run_dir)
    if (run_dir / "final").is_dir() and exit_code in (None, 0):
        return "finished"
    if any(run_dir.glob("checkpoint-*")) and exit_code in (None, 143, 130, -15):
        return "interrupted"
    return "failed"


def lock_is_held(path: Path) -> bool:
    """Whether a process holds the flock on path. Read from /proc/locks, never by taking the lock: a probe holding
    it even briefly could make a run that starts at that moment fail."""
    try:
        inode = path.stat().st_ino
    except OSError:
        return False
    try:
        locks = Path("/proc/locks").read_text()
    except OSError:  # not Linux: the process named in the lock file is alive
        holder = re.search(r"process (\d+)", path.read_text(errors="replace"))
        return bool(holder) and _alive(int(holder[1]))
    # e.g. "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF"
    return any(len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode)
               for parts in (line.split() for line in locks.splitlines()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def logged_exit_code(run_dir: Path) -> Optional[int]:
    """The exit code the page wrote at the end of LOG_FILE (None for a run it did not start, or still running)."""
    lines = log_tail(run_dir, 1).splitlines()
    match = EXIT_LINE.match(lines[-1]) if lines else None
    return int(match[1]) if match else None


def log_tail(run_dir: Path, lines: int = 30) -> str:
    """The last non-empty lines of the page's log of the run, each progress bar as its last state."""
    path = run_dir / LOG_FILE
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = ANSI_ESCAPE.sub("", text)  # tqdm's cursor moves between its bars
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join([line for line in shown if line][-lines:])


def progress(run_dir: Path) -> tuple[int, Optional[int]]:
    """(last logged optimiser step, max_steps when the config sets it)."""
    steps = [int(row["step"]) for row in metrics_rows(run_dir) if "step" in row]
    total = run_config(run_dir).get("max_steps")
    return max(steps, default=0), int(total) if total else None


def chart_groups(run_dir: Path) -> dict[str, dict[str, Series]]:
    """The run's charts (plots.chart_data, as `rlhf-time plot` draws them) in the Train tab's three places: "loss"
    (train and eval loss), "reward" (every chart of a reward or score) and "eval" (the other evaluation metrics)."""
    rows = metrics_rows(run_dir)
    groups: dict[str, dict[str, Series]] = {"loss": {}, "eval": {}, "reward": {}}
    for chart, series in (chart_data({run_dir.name: rows}) if rows else {}).items():
        if chart == "loss":
            groups["loss"][chart] = series
        elif "reward" in chart or "score" in chart:
            groups["reward"][chart] = series
        elif any(label.endswith("eval") for label in series):
            groups["eval"][chart] = series
    return groups


def draw_run_charts(run_dir: Path, out_dir: Path) -> dict[str, list[Path]]:
    """chart_groups drawn as PNGs (plots.draw_charts) into out_dir/<group>/, replacing what was there."""
    drawn = {}
    for group, charts in chart_groups(run_dir).items():
        folder = out_dir / group
        for old in folder.glob("*.png"):
            old.unlink()
        drawn[group] = draw_charts(charts, folder) if charts else []
    return drawn


REPORT_IMAGE = re.compile(r"!\[([^\]]*)\]\((?![a-z]+://|/)([^)\s]+)\)")


def report_markdown(run_dir: Path, file_url) -> str:
    """report.md with its charts' relative links turned into file_url(absolute path), so a page can show them."""
    path = run_dir / "report.md"
    if not path.is_file():
        return f"{run_dir.name}: no report.md (it is written when a run ends)"
    markdown = path.read_text(encoding="utf-8")
    return REPORT_IMAGE.sub(lambda m: f"![{m[1]}]({file_url((run_dir / m[2]).resolve())})", markdown)
