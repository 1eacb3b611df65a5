"""A run folder belongs to one run: a new run never silently mixes its metrics, charts or checkpoints with an old one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rlhf_time.errors import RlhfTimeError

log = logging.getLogger("rlhf_time")

# What a run writes into output_dir/experiment_name (the data cache lives elsewhere and is safe to share).
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md")
RUN_FOLDERS = ("final", "tensorboard", "plots", "wandb")


def previous_run_items(run_dir: Path) -> list[Path]:
    """The files and folders of an earlier run found in run_dir (empty when the folder is new or unused)."""
    if not run_dir.is_dir():
        return []
    items = [run_dir / name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]
    items += sorted(run_dir.glob("checkpoint-*"))
    return items


def refuse_occupied_run_folder(config) -> None:
    """The early, read-only form of claim_run_folder for the CLI: fail before any model is loaded."""
    if not (config.resume_from_checkpoint or config.overwrite_output_dir):
        claim_run_folder(config.run_dir, resuming=False, overwrite=False)


def claim_run_folder(run_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an old one unless resuming or overwrite_output_dir is set.

    With overwrite the old run's items are removed first, so metrics.jsonl, TensorBoard and the checkpoint
    rotation only ever see this run.
    """
    items = previous_run_items(run_dir)
    if not items or resuming:
        return
    names = ", ".join(item.name for item in items[:4]) + (", ..." if len(items) > 4 else "")
    if not overwrite:
        raise RlhfTimeError(
            f"{run_dir} already holds a run ({names}); set resume_from_checkpoint=latest to continue it, "
            f"overwrite_output_dir=true to replace it, or choose another experiment_name"
        )
    log.info(f"overwrite_output_dir: removing the previous run in {run_dir} ({names})")
    for item in items:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
