"""Pre-emption: SIGTERM, SIGINT or SIGUSR1 finish the current optimiser step, write a checkpoint and stop.

SLURM, Kubernetes and spot instances send SIGTERM some seconds before they kill a job; SLURM can send
SIGUSR1 earlier still (`--signal=USR1@120`); Ctrl-C is SIGINT. The handler only records the signal; the
loop asks `requested()` after each optimiser step, at a point where the state is consistent, and all ranks
agree on the answer (one scalar all-reduce), so every rank writes the same checkpoint and exits together.
A second signal of the same kind while the checkpoint is being written takes its default action.

A signal that is ignored when training starts stays ignored (the Unix rule for programs that catch signals):
a shell starts background jobs (`cmd &`, `nohup cmd &` in a script) with SIGINT ignored, so that a Ctrl-C
meant for the foreground job does not reach them; such a run goes on, and SIGTERM still stops it cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Optional

import torch

from rlhf_time.errors import TrainingInterrupted
from rlhf_time.runtime.distributed import DistributedContext, all_reduce_sum

log = logging.getLogger("rlhf_time")

# Exit codes follow the shell convention 128 + signal number; SIGUSR1 (a "stop soon" warning) exits like SIGTERM.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 143}


class StopSignals:
    """Context manager: while training, the stop signals set a flag instead of killing the process."""

    def __init__(self) -> None:
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for signum in EXIT_CODES:
                if signal.getsignal(signum) is signal.SIG_IGN:  # whoever started us chose to ignore it
                    log.info("%s is ignored in this process: it will not stop training", signum.name)
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        signum = signal.Signals(signum)
        if self.received == signum:  # asked twice: the user (or scheduler) insists, give up the clean stop
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s received: finishing this optimiser step, then writing a checkpoint", signum.name)

    def requested(self, dist: DistributedContext) -> bool:
        """Whether any rank received a stop signal (a collective under torchrun: call it on every rank)."""
        flag = self.received is not None
        if not dist.enabled:
            return flag
        return bool(all_reduce_sum(torch.tensor(int(flag), device=dist.device)) > 0)

    def interruption(self, checkpoint: Path) -> TrainingInterrupted:
        """The exception that ends train() after the checkpoint is written; the CLI exits with its code."""
        signum = self.received or signal.SIGTERM  # another rank got it: stop the same way
        return TrainingInterrupted(
            f"saved {checkpoint.name} on {signum.name}; resume with resume_from_checkpoint=latest",
            exit_code=EXIT_CODES[signum], checkpoint=checkpoint,
        )
