"""Write a folder atomically: build it under a temporary name next to the target, then rename it into place.

Folders are given the permissions any file the process saves gets (the umask), not mkdtemp's private 0o700.
A folder that is replaced, or deleted by checkpoint rotation, is first renamed to a `.trash-` name and only
then removed, so a process killed half-way never leaves a half-deleted folder under its real name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

# `.<name>.trash-<random>`: a folder on its way out (removed by remove_trash, ignored everywhere else).
TRASH_PATTERN = re.compile(r"^\..+\.trash-[0-9a-f]+$")


@contextlib.contextmanager
def atomic_directory(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a staging folder; on success it takes `target`'s place whole, on error it is removed and `target`
    is untouched.

    replace=True: an existing `target` (a folder this program wrote, e.g. final/ of a resumed run) is moved
    aside and deleted after the new one is in place. replace=False: `target` may only be missing or an empty
    folder; anything else raises OSError (ENOTEMPTY/EEXIST) and nothing of the user's is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        apply_umask(staging)
        old = None
        if replace and target.is_dir() and not target.is_symlink() and any(target.iterdir()):
            old = move_to_trash(target)
        os.replace(staging, target)  # onto a missing path or an empty folder; never over a file's contents
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_to_trash(folder: Path) -> Path:
    """Rename `folder` to `.<name>.trash-<random>` beside it (one atomic rename) and return the new path."""
    trash = folder.with_name(f".{folder.name}.trash-{uuid.uuid4().hex[:12]}")
    os.replace(folder, trash)
    return trash


def remove_trash(parent: Path) -> list[Path]:
    """Delete the `.trash-` folders a killed process left in `parent`."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and TRASH_PATTERN.match(p.name)]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything below it the modes a plain mkdir/open would have: 0o777/0o666 minus the umask."""
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
