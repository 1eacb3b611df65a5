"""Experiment trackers (report_to): TensorBoard, Weights & Biases, MLflow, SwanLab through accelerate's tracker layer.

accelerate (a dependency of peft, so always present) keeps one small, maintained adapter per tracker with the
same three calls: store_init_configuration(config), log(values, step), finish(). We only choose where each one
writes, and import a tracker's package only when it is asked for.

Where runs go (each can be redirected by the tracker's own environment variables):
- tensorboard: run_dir/tensorboard
- wandb: run_dir/wandb; project = tracker_project; offline with WANDB_MODE=offline
- mlflow: MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns (MLFLOW_ALLOW_FILE_STORE=true is set); experiment = tracker_project, run = experiment_name
- swanlab: output_dir/swanlog; project = tracker_project; SWANLAB_MODE=local|offline|cloud (default: local)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from rlhf_time.errors import RlhfTimeError

# tracker name -> (module to import, package to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "swanlab": ("swanlab", "swanlab"),
}
DEFAULT_PROJECT = "rlhf_time"


def check_trackers_installed(names: list[str]) -> None:
    """Fail before any model is loaded when a requested tracker's package is missing (nothing is imported)."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise RlhfTimeError(f"report_to={name} needs the {package} package: pip install {package} "
                                f"(or pip install 'rlhf_time[trackers]' for all trackers)")


def open_trackers(config, run_dir: Path) -> list:
    """Started accelerate trackers for config.report_to; the caller is the main rank (no per-call rank checks)."""
    check_trackers_installed(config.report_to)
    import torch
    from accelerate import PartialState

    # accelerate's trackers log through its logger, which needs its process state. Our process group already
    # exists, so PartialState only reads it; OMP_NUM_THREADS keeps it from re-setting this rank's CPU threads.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    PartialState()
    trackers = [_make_tracker(name, config, Path(run_dir)) for name in config.report_to]
    for tracker in trackers:
        tracker.main_process_only = False  # only rank 0 builds trackers; skip accelerate's PartialState lookup
        tracker.start()
    return trackers


def _make_tracker(name: str, config, run_dir: Path):
    from accelerate import tracking

    project = config.tracker_project or DEFAULT_PROJECT
    if name == "tensorboard":
        return _tensorboard_tracker(run_dir)
    if name == "wandb":
        return tracking.WandBTracker(project, name=config.experiment_name, dir=str(run_dir))
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A plain folder needs no server or database; MLflow 3 keeps its file store behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(config.output_dir).resolve() / "mlruns").as_uri())
        return tracking.MLflowTracker(experiment_name=project, run_name=config.experiment_name)
    if name == "swanlab":
        # SwanLab's default (cloud) asks for a login interactively; local needs no account.
        mode = os.environ.get("SWANLAB_MODE", "local")
        return tracking.SwanLabTracker(project, name=config.experiment_name, mode=mode,
                                       log_dir=str(Path(config.output_dir) / "swanlog"))
    raise RlhfTimeError(f"unknown tracker {name!r}; allowed: {', '.join(PACKAGES)}")


def _tensorboard_tracker(run_dir: Path):
    """accelerate's TensorBoard tracker, with the config stored as a text summary in the run's one events file.

    (accelerate stores it with add_hparams, which writes a second events file in a timestamped sub-folder per
    call; TensorBoard would then list each as a separate run next to the real one.)
    """
    import yaml
    from accelerate.tracking import TensorBoardTracker

    class TensorBoardConfigAsText(TensorBoardTracker):
        def store_init_configuration(self, values: dict) -> None:
            text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented = code block
            self.writer.flush()

    return TensorBoardConfigAsText("tensorboard", str(run_dir))


def flat_config(config) -> dict[str, Any]:
    """The resolved config as scalar hyperparameters (lists and None as text: every tracker accepts these)."""
    flat = {}
    for key, value in config.to_dict().items():
        flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat
