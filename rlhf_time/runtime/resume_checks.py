"""Checks before a resumed run continues: the saved data position still points at the same data, and there is
something left to train. Both fail before anything in the run folder is written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from rlhf_time.errors import RlhfTimeError

log = logging.getLogger("rlhf_time")

# The settings the planned micro-batches depend on (data/plan_batches, and which examples are loaded): with any
# of them changed, the checkpoint's (epoch, batch index) names other examples than the ones it stopped before.
PLAN_FIELDS = ("batch_size", "max_tokens_per_batch", "group_by_length", "shuffle", "seed", "max_train_samples")


def data_position_changes(saved: dict[str, Any], config, saved_world_size: int, world_size: int) -> list[str]:
    """What changed since the checkpoint that moves its data position, e.g. ['batch_size 8 -> 4']."""
    changes = [f"{name} {saved[name]!r} -> {getattr(config, name)!r}"
               for name in PLAN_FIELDS if name in saved and saved[name] != getattr(config, name)]
    old_accumulation = saved.get("gradient_accumulation_steps")
    # N ranks x accumulation A take the same N*A consecutive micro-batches per step as one process with N*A.
    if old_accumulation is not None and old_accumulation * saved_world_size != config.gradient_accumulation_steps * world_size:
        changes.append(f"micro-batches per step (gradient_accumulation_steps x ranks) {old_accumulation} x "
                       f"{saved_world_size} -> {config.gradient_accumulation_steps} x {world_size}")
    return changes


def check_data_position(folder: Path, config, saved_world_size: int, world_size: int) -> None:
    """Refuse a resume whose settings move the data position, unless config.ignore_data_position (then warn)."""
    path = folder / "config.yaml"
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    changes = data_position_changes(saved if isinstance(saved, dict) else {}, config, saved_world_size, world_size)
    if not changes:
        return
    what = "; ".join(changes)
    if not config.ignore_data_position:
        raise RlhfTimeError(f"{folder}: {what} since this checkpoint, so its data position would point at other "
                            f"examples (part of the epoch skipped or repeated); resume with the checkpoint's settings "
                            f"or set ignore_data_position=true")
    log.warning(f"ignore_data_position: {what}; training continues at the checkpoint's epoch and batch index of the "
                f"new batch plan, which is not where the checkpoint stopped")


def check_work_left(folder: Path, step: int, total_steps: int, config) -> None:
    """Refuse to resume a checkpoint at or past the run's last step: there would be nothing to train."""
    if step < total_steps:
        return
    limit = f"max_steps={config.max_steps}" if config.max_steps else f"num_train_epochs={config.num_train_epochs}"
    raise RlhfTimeError(f"{folder} is at step {step} and this run ends at step {total_steps} ({limit}): nothing left "
                        f"to train; set max_steps above {step} to continue it")
