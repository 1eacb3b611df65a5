"""Where metrics go: console lines, metrics.jsonl and the experiment trackers of report_to (main rank only)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from rlhf_time.errors import RlhfTimeError
from rlhf_time.storage import what_is_kept

log = logging.getLogger("rlhf_time")


class RunReporter:
    """Writes each metrics dict to metrics.jsonl, every tracker in config.report_to, and the console log.

    All trackers receive the same scalars at the same steps, the resolved config once at the start, and the
    run's summary (summary/*) at the final step.
    """

    def __init__(self, run_dir: Path, config, enabled: bool) -> None:
        self.enabled = enabled
        self.trackers: list = []
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.report_to:
            from rlhf_time.runtime.trackers import flat_config, open_trackers

            self.trackers = open_trackers(config, run_dir)
            for tracker in self.trackers:
                tracker.store_init_configuration(flat_config(config))

    def report(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **numbers}) + "\n")
        except OSError as error:  # disk full, read-only remount, I/O error: stop with one line, saved state as is
            raise RlhfTimeError(f"{self.metrics_path}: cannot append the metrics of step {step} "
                                f"({error.strerror or error}); training stopped. "
                                f"{what_is_kept(self.metrics_path.parent)}") from None
        finite = {key: value for key, value in numbers.items() if math.isfinite(value)}
        for tracker in self.trackers:
            tracker.log(finite, step=step)
        if console:
            log.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in numbers.items()))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _fmt(value: float) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def drop_metrics_after(metrics_path: Path, step: int) -> int:
    """Remove the rows logged after `step` (a resume repeats those steps); returns how many were dropped.

    The file is rewritten through a temporary file and os.replace, so a crash here cannot lose the kept rows.
    """
    if not metrics_path.is_file():
        return 0
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) == len(lines):
        return 0
    staging = metrics_path.with_name(metrics_path.name + ".tmp")
    staging.write_text("".join(kept), encoding="utf-8")
    os.replace(staging, metrics_path)
    return len(lines) - len(kept)


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl row; a torn last line (killed mid-write) counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
