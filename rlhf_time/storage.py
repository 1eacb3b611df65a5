"""Where a run writes: folders checked before the work starts, and a full disk reported as one clear line.

Problems with the output folder (a file in the way, read-only, no permission) are found before any model is
loaded, rather than as a traceback after the first hour of training. A disk that fills up while a checkpoint
or the final model is written becomes a RlhfTimeError naming the folder, the space needed and the space left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from safetensors import SafetensorError

from rlhf_time.errors import RlhfTimeError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def require_writable_folder(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove a file can be written in it; else one line saying why not."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "it" if blocker == path else str(blocker)
        raise RlhfTimeError(f"{what} {path}: {where} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise RlhfTimeError(f"{what} {path}: cannot write there ({error.strerror or error})") from None
    return path


def check_output_folders(config, cache_dir: Optional[str | Path]) -> None:
    """The run folder (when training) and the tokenised-data cache (when there is data) can be written."""
    if config.train_file:
        require_writable_folder(config.run_dir, "output_dir/experiment_name")
    if cache_dir is not None and (config.train_file or config.eval_file):
        require_writable_folder(cache_dir, "data_cache_dir")


def _file_in_the_way(path: Path) -> Optional[Path]:
    """The first existing component of `path` (itself included) that is not a folder."""
    for candidate in [*reversed(path.parents), path]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


@contextlib.contextmanager
def disk_full_is_an_error(target: Path, what: str, needed_bytes: Optional[Callable[[], int]] = None) -> Iterator[None]:
    """Turn 'no space left' / 'quota exceeded' / 'read-only' while writing `target` into one RlhfTimeError.

    The caller writes through a staging folder (atomic_directory), which is removed on the way out, so the
    message can promise that nothing partial was left and the earlier checkpoints are intact.
    """
    try:
        yield
    except OSError as error:
        if error.errno in FULL_DISK:
            raise RlhfTimeError(_no_space_message(target, what, needed_bytes() if needed_bytes else None)) from None
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise RlhfTimeError(f"{target}: cannot write {what} ({error.strerror})") from None
        raise
    except (RuntimeError, ValueError, SafetensorError):
        # Writers in C++/Rust (torch's zip writer, safetensors) report a full disk as their own error type;
        # it is a full disk when the file system has less room left than the write needs.
        needed = needed_bytes() if needed_bytes else None
        if needed is not None and free_bytes(target) < needed:
            raise RlhfTimeError(_no_space_message(target, what, needed)) from None
        raise


def _no_space_message(target: Path, what: str, needed: Optional[int]) -> str:
    need = f"needs about {format_bytes(needed)}, " if needed else ""
    return (f"{target}: no space left on the device while writing {what} ({need}"
            f"{format_bytes(free_bytes(target))} free in {_existing(target)}); the partial folder was removed. "
            f"{what_is_kept(target.parent, but=target)}")


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (by step)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def what_is_kept(run_dir: Path, but: Optional[Path] = None) -> str:
    """After a failed write in run_dir: the checkpoint a run can resume from, or that there is none."""
    kept = [path for path in list_checkpoints(Path(run_dir)) if path != but]
    if kept:
        latest = kept[-1]
        return (f"Earlier checkpoints are intact (latest {latest.name}): free some space (or lower "
                f"save_total_limit) and resume with resume_from_checkpoint=latest.")
    return ("No checkpoint was saved before this point, so the weights trained in this run are lost: free some "
            "space and train again (save_strategy: steps keeps checkpoints to resume from).")


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tensor_bytes(*objects: Any) -> int:
    """Bytes held by the tensors in (nested dicts/lists of) objects: what a checkpoint of them needs on disk."""
    import torch

    total, stack = 0, list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"
