"""A run folder belongs to one run: a new run never silently mixes its metrics, charts or checkpoints with an old one."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from rlhf_time.errors import RlhfTimeError

log = logging.getLogger("rlhf_time")

# What a run writes into output_dir/experiment_name (the data cache lives elsewhere and is safe to share).
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md")
RUN_FOLDERS = ("final", "tensorboard", "plots", "wandb")
LOCK_FILE = ".lock"  # held (flock) by the process training in the folder; the OS drops it when that process dies


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
    if not any(item.name == "final" or item.name.startswith("checkpoint-") for item in items):
        # A run that failed before its first checkpoint left only its logs: nothing to resume, nothing to keep.
        log.info(f"{run_dir} holds only the logs of a run that ended before its first checkpoint ({names}); "
                 f"they are replaced")
    elif overwrite:
        log.info(f"overwrite_output_dir: removing the previous run in {run_dir} ({names})")
    else:
        raise RlhfTimeError(
            f"{run_dir} already holds a run ({names}); set resume_from_checkpoint=latest to continue it, "
            f"overwrite_output_dir=true to replace it, or choose another experiment_name"
        )
    for item in items:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on run_dir for the block; a second run in the same folder is refused at once.

    An OS file lock (flock), not a marker file: it disappears with the process however that ends (kill -9
    included), so a crashed run never blocks its own resume. The lock file is removed on a normal exit.
    """
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RlhfTimeError(f"{run_dir} is in use by another training run ({holder}); wait for it to end or "
                                f"choose another experiment_name") from None
        # The previous holder removes the file as it lets go: a lock on that removed file guards nothing.
        if path.exists() and path.stat().st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked here, so no other process holds this file
        handle.close()  # closing the file releases the lock
