"""Where a loop step's micro-batches come from: one object with `next()`, `state_dict()` and `load_state_dict()`.

Two sources fill it:
  * `PlannedBatches`: a tokenised data set; each epoch's plan (micro-batches of example indices, this rank's share)
    is a pure function of (seed, epoch), so a position (epoch, index in the plan) resumes exactly;
  * `StreamedSource`: a stream (data/streaming.py) that yields micro-batches of examples and checkpoints its own
    reader position.
`next()` returns the step's micro-batches as (indices, dataset) pairs: the stage's `collate(indices, dataset)`
turns each into tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

MicroBatch = tuple[list[int], Sequence]  # (example indices, the data set they index)


class PlannedBatches:
    """`accumulation` planned micro-batches per step, epoch after epoch (a step never spans two epochs)."""

    def __init__(self, dataset: Sequence, plan: Callable[[int], list[list[int]]], accumulation: int) -> None:
        self.dataset, self.plan, self.accumulation = dataset, plan, accumulation
        self.epoch = 0  # epoch of the next micro-batch
        self.batch_index = 0  # index of the next micro-batch within that epoch's plan
        self._planned: tuple[int, list[list[int]]] = (-1, [])

    def current_plan(self) -> list[list[int]]:
        if self._planned[0] != self.epoch:
            self._planned = (self.epoch, self.plan(self.epoch))
        return self._planned[1]

    def next(self) -> list[MicroBatch]:
        while self.batch_index >= len(self.current_plan()):  # epoch finished: move on
            self.epoch, self.batch_index = self.epoch + 1, 0
        group = self.current_plan()[self.batch_index : self.batch_index + self.accumulation]
        self.batch_index += len(group)
        return [(indices, self.dataset) for indices in group]

    @property
    def epoch_ended(self) -> bool:
        """Whether the last step took the epoch's last micro-batch."""
        return self.batch_index >= len(self.current_plan())

    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.batch_index / max(1, len(self.current_plan()))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, Any], saved_world_size: int = 1, world_size: int = 1) -> None:
        """A position saved on `saved_world_size` ranks; each rank's plan is 1/world_size of the global plan, so the
        index is re-mapped to the same point in the global plan."""
        self.epoch = state["epoch"]
        self.batch_index = state["batch_index"] * saved_world_size // world_size


class StreamedSource:
    """The stream's next `accumulation` micro-batches (lists of examples); its epochs run on without a plan."""

    epoch_ended = False  # a stream has no epoch boundary a step could end on

    def __init__(self, stream, accumulation: int) -> None:
        self.stream, self.accumulation = stream, accumulation
        self.batch_index = 0  # micro-batches taken (the stream's own state says where its reader is)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def next(self) -> list[MicroBatch]:
        group = self.stream.next_micro_batches(self.accumulation)
        self.batch_index += len(group)
        return [(list(range(len(examples))), examples) for examples in group]

    def progress(self) -> float:
        """Passes the stream's reader has completed (no length to divide by)."""
        return float(self.stream.epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
