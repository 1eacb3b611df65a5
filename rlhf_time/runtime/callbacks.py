"""Callbacks: plain callables `fn(trainer)` after every optimiser step, or a TrainerCallback with richer hooks."""

from __future__ import annotations

from typing import Any


class TrainerCallback:
    """Override the hooks you need; each receives the trainer (read `trainer.global_step`, `trainer.model`, ...)."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer: Any, checkpoint_dir: str) -> None: ...

    def on_train_end(self, trainer: Any, results: dict[str, Any]) -> None: ...


def fire(callbacks: list, event: str, trainer: Any, *args: Any) -> None:
    """Call `event` on every TrainerCallback; plain callables are called with the trainer on step end."""
    for callback in callbacks:
        if isinstance(callback, TrainerCallback):
            getattr(callback, event)(trainer, *args)
        elif event == "on_step_end":
            callback(trainer)
