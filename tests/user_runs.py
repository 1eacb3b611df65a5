"""One working folder in which the README's and the examples' `rlhf-time train` commands run, each once per session.

tests/test_docs_blocks.py runs every command of the README and docs/stages.md, and tests/test_examples.py runs every
file of examples/; both run the quickstart and the same example YAMLs with the same shortening (max_steps=2). Run
twice, the same training costs twice, so both tests train through `UserFolder.train`: the first one to ask for a
run starts it (in this folder, through `rlhf_time.cli.main`, as before), and each test checks the run's exit code,
what it wrote to stderr and its run folder, as it did with its own run. A run is the same run whatever spelling
its YAML path has (`examples/sft_full.yaml` from this folder, or the file's absolute path).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    argv: list[str]  # after `rlhf-time train`, as first run
    code: int | None = None  # main()'s exit code; None if it raised `error`
    err: str = ""  # what the run wrote to sys.stderr
    error: BaseException | None = None
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # outputs/ right after the run: path -> size, mtime

    def unchanged(self, run_dir: Path, folder: Path) -> bool:
        """Whether run_dir holds the files it held right after this run (no later command replaced them)."""
        prefix = run_dir.relative_to(folder).as_posix() + "/"
        then = {path: stamp for path, stamp in self.files.items() if path.startswith(prefix)}
        now = {path: stamp for path, stamp in file_stamps(folder).items() if path.startswith(prefix)}
        return bool(then) and then == now


def file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    stamps = {}
    for path in (folder / "outputs").rglob("*"):
        if path.is_file():
            stat = path.stat()
            stamps[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return stamps


class _Tee(io.TextIOBase):
    """Writes to the stream that was sys.stderr (pytest's capture, as before) and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


class UserFolder:
    """A fresh working folder with the repository's `examples/` and `rlhf_time/` (so the pages' relative paths resolve
    as from the repository root) and its own tiny-model cache (built as on a new machine)."""

    def __init__(self, folder: Path):
        self.folder = folder
        for name in ("examples", "rlhf_time"):
            (folder / name).symlink_to(ROOT / name, target_is_directory=True)
        self.cache = folder / "cache"
        self.runs: dict[tuple, Run] = {}

    def key(self, argv: list[str]) -> tuple:
        """The run a `train` command stands for: its YAML file (resolved from this folder) and its overrides."""
        if argv and not argv[0].startswith("-") and "=" not in argv[0]:
            return (str((self.folder / argv[0]).resolve()), *argv[1:])
        return (None, *argv)

    def train(self, argv: list[str]) -> Run:
        """`rlhf-time train <argv>` in this folder, once: a later call with the same run gets the first one's Run."""
        key = self.key(argv)
        if key not in self.runs:
            self.runs[key] = self._train(argv)
        run = self.runs[key]
        if run.error is not None:
            raise run.error
        return run

    def _train(self, argv: list[str]) -> Run:
        from rlhf_time.cli import main

        run = Run(list(argv))
        previous_dir, previous_cache = os.getcwd(), os.environ.get("RLHF_TIME_CACHE")
        stdin, stderr = sys.stdin, sys.stderr
        tee = _Tee(sys.stderr)
        os.chdir(self.folder)
        os.environ["RLHF_TIME_CACHE"] = str(self.cache)
        sys.stdin, sys.stderr = io.StringIO(""), tee
        try:
            run.code = main(["train", *argv])
        except (Exception, SystemExit) as error:  # re-raised to every test that asks for this run
            run.error = error
        finally:
            sys.stdin, sys.stderr = stdin, stderr
            os.chdir(previous_dir)
            if previous_cache is None:
                os.environ.pop("RLHF_TIME_CACHE", None)
            else:
                os.environ["RLHF_TIME_CACHE"] = previous_cache
        run.err = tee.copy.getvalue()
        run.files = file_stamps(self.folder)
        return run
