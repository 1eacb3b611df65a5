"""The Evaluate / Export tab: `rlhf-time eval`, `score` and `export`, each run as the CLI in a child process, so the
page shows exactly what the command prints (its result, or its one-line error) and a crash stays in the child."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class CommandResult:
    command: list[str]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> Optional[str]:
        """The CLI's one-line error (`error: ...`), or the last line of its output when it failed otherwise."""
        if self.exit_code == 0:
            return None
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return next((line for line in reversed(lines) if line.startswith("error: ")),
                    lines[-1] if lines else f"exit code {self.exit_code}")

    def shown(self) -> str:
        """What the page prints: the command line, then its result or its error."""
        head = "$ rlhf-time " + " ".join(self.command)
        if self.error:
            return f"{head}\n{self.error}"
        return f"{head}\n{self.stdout.strip()}\n{_summary(self.stderr)}".strip()


def _summary(stderr: str) -> str:
    """The CLI's own closing lines on stderr (progress bars and log lines dropped)."""
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.splitlines()]
    return "\n".join(line for line in lines[-3:] if line.strip() and "it/s]" not in line and "s/it]" not in line)


def run_cli(arguments: list[str], timeout: float = 3600) -> CommandResult:
    """`rlhf-time ARGUMENTS` in a child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "rlhf_time", *arguments], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)
    return CommandResult(arguments, done.returncode, done.stdout, done.stderr)


def eval_config(work_dir: Path, stage: str, model: str, eval_file: str, max_seq_length: Optional[int]) -> Path:
    """The YAML `rlhf-time eval` reads: a model, an eval file and the stage whose metrics to compute."""
    values = {"stage": stage, "model_name": _absolute(model), "eval_file": _absolute(eval_file),
              "report_to": [], "output_dir": str(work_dir / "eval_outputs")}
    if max_seq_length:
        values["max_seq_length"] = int(max_seq_length)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "eval.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def evaluate(work_dir: Path, stage: str, model: str, eval_file: str, max_seq_length: Optional[int] = None) -> CommandResult:
    return run_cli(["eval", str(eval_config(work_dir, stage, model, eval_file, max_seq_length))])


def score(model: str, input_file: str, output_file: str) -> CommandResult:
    return run_cli(["score", model.strip(), "--input", input_file.strip(), "--output", output_file.strip()])


def export(adapter: str, output: str, dtype: Optional[str] = None, trust_remote_code: bool = False) -> CommandResult:
    arguments = ["export", adapter.strip(), output.strip()]
    arguments += ["--dtype", dtype] if dtype else []
    arguments += ["--trust-remote-code"] if trust_remote_code else []
    return run_cli(arguments)


def _absolute(path: str) -> str:
    path = path.strip()
    return str(Path(path).resolve()) if path and Path(path).exists() else path
