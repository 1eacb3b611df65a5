"""Where metrics go: console lines, TensorBoard scalars and metrics.jsonl (main rank only)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf_time")


class RunReporter:
    """Writes each metrics dict to metrics.jsonl, TensorBoard (optional) and the console log."""

    def __init__(self, run_dir: Path, report_to: str, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def report(self, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **numbers}) + "\n")
        if self.writer is not None:
            for key, value in numbers.items():
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if console:
            log.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in numbers.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"
