"""Which gloo threads a torchrun worker still runs when Python starts to shut down.

A worker calls `watch(OUT_DIR)` before it builds a trainer, so this hook runs after the library's teardown (atexit
runs the last registered hook first). Python ends a thread that takes the GIL while it finalises, and a gloo thread
ends so inside a C++ destructor: "terminate called without an active exception", SIGABRT. None may be left.
"""

import atexit
import json
import os
from pathlib import Path

_seen_while_running: list[str] = []


def gloo_threads() -> list[str]:
    names = (Path("/proc/self/task", task, "comm").read_text().strip() for task in os.listdir("/proc/self/task"))
    return sorted(name for name in names if "gloo" in name)


def watch(out_dir: str, launch: str = "") -> None:
    """At exit, write OUT_DIR/exit<-launch>-rank<R>.json: the gloo threads seen by note_running() and those left."""
    path = Path(out_dir) / f"exit{'-' if launch else ''}{launch}-rank{os.environ.get('RANK', '0')}.json"
    atexit.register(lambda: path.write_text(json.dumps({"running": _seen_while_running, "at_exit": gloo_threads()})))


def note_running() -> None:
    """Record the gloo threads alive now (end of main): shows the probe sees them at all."""
    _seen_while_running[:] = gloo_threads()


def assert_no_gloo_thread_at_exit(out_dir: Path, launch: str = "", world_size: int = 2) -> None:
    for rank in range(world_size):
        seen = json.loads((Path(out_dir) / f"exit{'-' if launch else ''}{launch}-rank{rank}.json").read_text())
        assert seen["running"], f"rank {rank}: no gloo thread seen while running; the probe is blind"
        assert seen["at_exit"] == [], f"rank {rank}: gloo threads still running when Python shuts down: {seen}"
