"""Environments: multi-turn episodes whose replies come from a program (a game, a simulator, a user model).

An environment is a class with

    reset(record) -> str | None                              the first user message, or None: the record's prompt
    step(assistant_text) -> (next_user_message | None, reward | None, done)

The run makes one instance per episode (`Class()`), so an environment keeps its episode's state in `self`; `record`
is the prompt record's fields as a dict. The episode ends when `done` is true or no next message comes. The rewards
of an episode's steps are summed, and that sum joins the reward functions' weighted sum as one more reward, named
after the class. `step` may be `async def`; the steps of one turn of every episode run at once (async ones on one
event loop, plain ones in `rollout.reward_workers` threads), as reward functions do.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

from rlhf_time.errors import RlhfTimeError
from rlhf_time.experience.episodes import Episode, Messages
from rlhf_time.experience.reward_calls import TIMED_OUT, call_all
from rlhf_time.user_functions import import_function


class EnvironmentFailure(RlhfTimeError):
    """An environment could not be loaded, or it answered with something that is not (message, reward, done)."""


def load_environment(spec) -> type:
    """The environment class of "package.module:Class" / "path/file.py:Class", or the class itself."""
    if isinstance(spec, type):
        return spec
    _, cls = import_function(spec, "environment", EnvironmentFailure)
    if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
        raise EnvironmentFailure(f"environment {spec!r}: expected a class with reset(record) and step(text)")
    return cls


class EnvironmentResponder:
    """One episode's environment: the assistant's text in, the next user message (or the end) out."""

    def __init__(self, environment_class: type) -> None:
        self.name = environment_class.__name__
        try:
            self.environment = environment_class()
        except Exception as error:
            raise EnvironmentFailure(f"environment {self.name}() raised {type(error).__name__}: {error}") from None

    def reset(self, record: dict[str, Any]) -> Optional[str]:
        try:
            first = self.environment.reset(record)
        except Exception as error:
            raise EnvironmentFailure(f"environment {self.name}.reset raised {type(error).__name__}: {error}") from None
        if first is not None and not isinstance(first, str):
            raise EnvironmentFailure(f"environment {self.name}.reset returned a {type(first).__name__}; expected the "
                                    f"first user message (str) or None")
        return first

    def assistant_message(self, text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": text}

    def reply(self, message: dict[str, Any], episode: Episode) -> Optional[Messages]:
        return self.answer(self.environment.step(message["content"]), episode)

    def answer(self, result: Any, episode: Episode) -> Optional[Messages]:
        """The reply to a step's result (next_user_message, reward, done); its reward is added to the episode's."""
        if isinstance(result, Exception):
            raise EnvironmentFailure(f"environment {self.name}.step raised {type(result).__name__}: {result}")
        if not (isinstance(result, tuple) and len(result) == 3):
            raise EnvironmentFailure(f"environment {self.name}.step returned {result!r}; expected "
                                    f"(next_user_message or None, reward or None, done)")
        next_message, reward, done = result
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, numbers.Real)
                                   or not math.isfinite(float(reward))):
            raise EnvironmentFailure(f"environment {self.name}.step returned reward {reward!r}; expected a finite "
                                    f"number or None")
        if next_message is not None and not isinstance(next_message, str):
            raise EnvironmentFailure(f"environment {self.name}.step returned a {type(next_message).__name__} as the "
                                    f"next message; expected str or None")
        episode.add_reward(reward)
        if done or next_message is None:
            return None
        return [{"role": "user", "content": next_message}]


def step_all(responders: Sequence[EnvironmentResponder], messages: Sequence[dict[str, Any]],
             episodes: Sequence[Episode], *, concurrency: int = 16, workers: int = 1,
             timeout: Optional[float] = None) -> list[Optional[Messages]]:
    """The replies of every episode's environment to its assistant turn, all steps at once."""
    results = call_all([(r.environment.step, (m["content"],), {}) for r, m in zip(responders, messages)],
                       concurrency=concurrency, workers=workers, timeout=timeout)
    replies = []
    for responder, result, episode in zip(responders, results, episodes):
        if result is TIMED_OUT:
            raise EnvironmentFailure(f"environment {responder.name}.step took longer than {timeout} s")
        replies.append(responder.answer(result, episode))
    return replies
