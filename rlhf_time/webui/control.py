"""Starting and stopping training runs from the page: `rlhf-time train RUN/config.yaml` as a child process.

The page writes the YAML into the run folder, after the library's own validation (the same TrainingConfig and
run-folder checks as the CLI), so a config error is the CLI's one line and nothing starts. A crash of the run
never reaches the page: it ends the child, whose output and exit code land in the run folder's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.stages import SECTIONS
from rlhf_time.webui.runs import LOG_FILE, lock_is_held, run_config

# Paths the YAML gets as absolute paths, so the run reads what the page's working folder meant.
PATH_FIELDS = ("model_name", "train_file", "eval_file")


def validate(values: dict[str, Any]) -> TrainingConfig:
    """The config the values make, and the checks `rlhf-time train` makes before loading a model; RlhfTimeError
    (the CLI's one line) otherwise."""
    from rlhf_time.runtime.run_folder import LOCK_FILE, refuse_occupied_run_folder

    config = TrainingConfig(**values)
    if lock_is_held(config.run_dir / LOCK_FILE):  # before refuse_occupied_run_folder, which clears a log-only folder
        raise RlhfTimeError(f"{config.run_dir} is in use by another training run; wait for it to end or choose "
                            f"another experiment_name")
    refuse_occupied_run_folder(config)
    return config


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Local model and data paths made absolute (hub ids, `tiny` and hf:// sources stay as written)."""
    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(item) for item in value]
        return str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value

    return {key: absolute(value) if key in PATH_FIELDS else value for key, value in values.items()}


def write_run_config(values: dict[str, Any]) -> Path:
    """Validate values (see validate) and write them as RUN/config.yaml; returns that path."""
    values = absolute_paths(values)
    config = validate(values)
    # The keys given, with the values as the config typed them ("2e-3" -> 0.002); a section keeps only its own keys.
    given = {key: set(value) if key in SECTIONS and isinstance(value, dict) else True for key, value in values.items()}
    typed = config.model_dump(mode="json", include=given)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path = config.run_dir / "config.yaml"
    path.write_text(yaml.safe_dump({key: typed[key] for key in values}, sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def resume_config(run_dir: Path) -> Path:
    """Rewrite a stopped run's config.yaml (the resolved config it saved) to continue from its newest checkpoint."""
    values = run_config(run_dir)
    if not values:
        raise RlhfTimeError(f"{run_dir}: no config.yaml to resume from")
    if not any(run_dir.glob("checkpoint-*")):
        raise RlhfTimeError(f"{run_dir}: no checkpoint to resume from")
    values["resume_from_checkpoint"] = "latest"
    TrainingConfig(**values)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


class RunProcess:
    """One `rlhf-time train` child; its stdout and stderr go to RUN/webui.log, then a line `exit code: N`."""

    def __init__(self, config_path: Path):
        self.run_dir = config_path.parent.resolve()
        log = open(self.run_dir / LOG_FILE, "w", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "rlhf_time", "train", str(config_path)]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)  # Ctrl-C of the page does not reach it
        log.close()
        threading.Thread(target=self._record_exit, daemon=True).start()

    def _record_exit(self) -> None:
        code = self.process.wait()
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"\nexit code: {code}\n")

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM: the training loop writes a checkpoint and exits (143)."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)


class RunControl:
    """The runs this page started, by run folder."""

    def __init__(self) -> None:
        self.processes: dict[Path, RunProcess] = {}
        self.lock = threading.Lock()

    def start(self, config_path: Path) -> RunProcess:
        run_dir = config_path.parent.resolve()
        with self.lock:
            previous = self.processes.get(run_dir)
            if previous is not None and previous.running:
                raise RlhfTimeError(f"{run_dir} is already training (started from this page)")
            self.processes[run_dir] = RunProcess(config_path)
            return self.processes[run_dir]

    def stop(self, run_dir: Path) -> bool:
        """Stop the page's run in run_dir; False when it has none running."""
        process = self.processes.get(Path(run_dir).resolve())
        if process is None or not process.running:
            return False
        process.stop()
        return True

    def alive(self) -> frozenset[Path]:
        return frozenset(path for path, process in self.processes.items() if process.running)

    def latest(self) -> Optional[RunProcess]:
        return next(reversed(self.processes.values()), None)

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.stop()
