"""Reward functions for on-policy stages (GRPO, PPO): built-ins, import strings, checked calls, weighted sum.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`: `prompts[i]` is the prompt text
(the last user message), `completions[i]` the sampled text, and every other field of the data record is passed by
name with one value per completion (e.g. `answer=[...]`), plus `completion_ids` (the sampled token ids). Functions
should accept `**kwargs` for the columns they do not use. `None` means "does not apply to this completion".
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from rlhf_time.errors import RlhfTimeError
from rlhf_time.experience.reward_calls import TIMED_OUT, call_all, is_async
from rlhf_time.user_functions import import_function

log = logging.getLogger("rlhf_time")

RewardFunction = Callable[..., list]


class RewardFunctionError(RlhfTimeError):
    """A reward function could not be loaded, raised, or returned something that is not one number per completion."""


def _normalise(text: str) -> str:
    return " ".join(str(text).split())


def exact_match(prompts: list[str], completions: list[str], answer: Optional[list] = None, **_: Any) -> list:
    """1.0 when the completion equals the record's `answer` with whitespace normalised (runs of spaces, tabs and
    newlines count as one space, ends stripped), else 0.0; None for records without an answer."""
    answers = answer if answer is not None else [None] * len(completions)
    return [None if a is None else float(_normalise(c) == _normalise(a)) for c, a in zip(completions, answers)]


def regex_match(prompts: list[str], completions: list[str], reward_regex: Optional[list] = None, **_: Any) -> list:
    """1.0 when the record's `reward_regex` pattern is found in the completion (re.search, DOTALL: anchor it with
    ^...$ to match the whole completion), else 0.0; None for records without a pattern."""
    patterns = reward_regex if reward_regex is not None else [None] * len(completions)
    return [None if p is None else float(re.search(p, c, flags=re.DOTALL) is not None)
            for c, p in zip(completions, patterns)]


def length_penalty(prompts: list[str], completions: list[str], completion_ids: Optional[list] = None, *,
                   max_completion_length: int = 256, **_: Any) -> list:
    """-(completion tokens) / max_completion_length, in [-1, 0]: a push towards short answers (weight it small)."""
    if completion_ids is None:
        raise TypeError("length_penalty needs the completion_ids column")
    return [-len(ids) / max_completion_length for ids in completion_ids]


def environment_reward(prompts: list[str], completions: list[str], environment_reward: Optional[list] = None,
                       **_: Any) -> list:
    """A multi-turn environment's rewards of each episode, summed over its steps (None where it gave none)."""
    return list(environment_reward) if environment_reward is not None else [None] * len(completions)


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "exact_match": exact_match,
    "regex_match": regex_match,
    "length_penalty": length_penalty,
}


def load_reward_function(spec: str | RewardFunction, *, max_completion_length: int = 256) -> tuple[str, RewardFunction]:
    """(name, function) for a built-in name, a "package.module:function" import string, a "path/file.py:function",
    or a callable; the name is the function's own (it names the reward's metrics)."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardFunctionError(f"reward function {spec!r}: expected a built-in name or 'package.module:function'")
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
        if fn is length_penalty:
            def bound(prompts, completions, **columns):
                return length_penalty(prompts, completions, max_completion_length=max_completion_length, **columns)
            return spec, bound
        return spec, fn
    module_name, colon, attribute = spec.rpartition(":")
    if not (colon and module_name and attribute):
        raise RewardFunctionError(f"unknown reward function {spec!r}; built-ins: {', '.join(BUILTIN_REWARDS)}, "
                                  f"or an import string 'package.module:function' or 'path/to/file.py:function'")
    return import_function(spec, "reward function", RewardFunctionError)  # metrics are named after the function


def call_reward_function(name: str, fn: RewardFunction, prompts: list[str], completions: list[str],
                         columns: dict[str, list]) -> list[Optional[float]]:
    """The function's rewards, checked: one finite number (or None) per completion, else RewardFunctionError."""
    try:
        values = fn(prompts, completions, **columns)
    except Exception as error:
        raise raised(name, error) from None
    return checked_values(name, values, len(completions))


def raised(name: str, error: Exception) -> RewardFunctionError:
    return RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}")


def checked_values(name: str, values: Any, count: int) -> list[Optional[float]]:
    """values as one finite float (or None) per completion, else RewardFunctionError naming the function."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(values).__name__}; "
                                  f"expected a list of {count} numbers (or None)")
    values = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(values) != count:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {count} completions")
    checked: list[Optional[float]] = []
    for index, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardFunctionError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for "
                                      f"completion {index}; expected a finite number or None")
        checked.append(float(value))
    return checked


def weighted_sum(per_function: list[list[Optional[float]]], weights: Sequence[float]) -> list[float]:
    """sum_f w_f r_f,i over the functions that apply to completion i (None ignored; 0.0 when none applies)."""
    totals = []
    for values in zip(*per_function):
        totals.append(sum(w * v for w, v in zip(weights, values) if v is not None))
    return totals


@dataclass
class RewardScorer:
    """Every reward of a run (functions, then an optional reward model), their weights, and the checked call.

    Called one function after another, as plain calls, unless a function is `async def`, `workers` > 1 or a
    `timeout` is set: then every function of the call runs concurrently (rlhf_time.experience.reward_calls).
    """

    functions: list[tuple[str, RewardFunction]]
    weights: list[float]
    concurrency: int = 16  # async calls in flight at most
    workers: int = 1  # threads for plain functions (1: called in turn, as plain calls)
    timeout: Optional[float] = None  # seconds per call; a late call gives None (on_timeout "none") or stops
    on_timeout: str = "none"

    @classmethod
    def from_config(cls, config, reward_funcs: Optional[Sequence] = None, reward_model: Optional[RewardFunction] = None,
                    environment: Optional[str] = None) -> "RewardScorer":
        """reward_funcs: callables or specs given in Python (they replace config.rollout.reward_funcs); reward_model: a
        callable with the reward-function signature (see RewardModelReward), appended; environment: the name of a
        multi-turn environment, whose summed rewards per episode are appended last."""
        specs = list(reward_funcs) if reward_funcs is not None else list(config.rollout.reward_funcs)
        functions = [load_reward_function(s, max_completion_length=config.rollout.max_completion_length) for s in specs]
        if reward_model is not None:
            functions.append(("reward_model", reward_model))
        if environment is not None:
            functions.append((environment, environment_reward))
        if not functions:
            raise RewardFunctionError("no reward: set rollout.reward_funcs (e.g. [exact_match]) and/or rollout.reward_model")
        weights = list(config.rollout.reward_weights) if config.rollout.reward_weights is not None else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise RewardFunctionError(f"rollout.reward_weights has {len(weights)} values for {len(functions)} rewards "
                                      f"({', '.join(name for name, _ in functions)})")
        options = config.rollout
        return cls(functions, weights, concurrency=options.reward_concurrency, workers=options.reward_workers,
                   timeout=options.reward_timeout, on_timeout=options.reward_on_error)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.functions]

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]
                 ) -> tuple[list[float], list[list[Optional[float]]]]:
        """(weighted total per completion, each function's values per completion)."""
        return self.score_many([(prompts, completions, columns)])[0]

    @property
    def concurrent(self) -> bool:
        return any(is_async(fn) for _, fn in self.functions) or self.workers > 1 or self.timeout is not None

    def score_many(self, requests: list[tuple[list[str], list[str], dict[str, list]]]
                   ) -> list[tuple[list[float], list[list[Optional[float]]]]]:
        """__call__ of each (prompts, completions, columns), e.g. a step's micro-batches: concurrent scorers run
        every function of every request at once (one event loop, one limit on calls in flight)."""
        if not self.concurrent:
            return [self._score_in_turn(*request) for request in requests]
        calls = [(fn, (prompts, completions), columns) for prompts, completions, columns in requests
                 for _, fn in self.functions]
        results = iter(call_all(calls, concurrency=self.concurrency, workers=self.workers, timeout=self.timeout))
        scored = []
        for _, completions, _ in requests:
            per_function = [self._checked(name, next(results), len(completions)) for name, _ in self.functions]
            scored.append((weighted_sum(per_function, self.weights), per_function))
        return scored

    def _score_in_turn(self, prompts, completions, columns) -> tuple[list[float], list[list[Optional[float]]]]:
        per_function = [call_reward_function(name, fn, prompts, completions, columns) for name, fn in self.functions]
        return weighted_sum(per_function, self.weights), per_function

    def _checked(self, name: str, result: Any, count: int) -> list[Optional[float]]:
        """A concurrent call's values; a late call gives None (one warning line) or stops; an exception stops: a
        broken reward must not quietly become 0."""
        if result is TIMED_OUT:
            if self.on_timeout == "stop":
                raise RewardFunctionError(f"reward function {name!r} took longer than reward_timeout={self.timeout} s "
                                          f"(reward_on_error: stop)")
            log.warning(f"warning: reward function {name!r} took longer than reward_timeout={self.timeout} s: its "
                        f"{count} rewards are None for this call")
            return [None] * count
        if isinstance(result, Exception):
            raise raised(name, result)
        return checked_values(name, result, count)


class RewardModelReward:
    """A reward model trained with stage rm as one more reward: its scalar score of (prompt messages + completion),
    laid out as that model was trained (its own saved templates and tokenizer; rlhf_time.inference scores it)."""

    def __init__(self, scorer, batch_size: int = 16) -> None:
        self.scorer, self.batch_size = scorer, batch_size  # an InferenceModel with head "reward"
        self.__name__ = "reward_model"

    @classmethod
    def from_folder(cls, folder: str, device=None, batch_size: int = 16) -> "RewardModelReward":
        from pathlib import Path

        from rlhf_time.inference import InferenceModel, is_reward_model

        if not Path(folder, "config.json").is_file() and not Path(folder, "adapter_config.json").is_file():
            raise RewardFunctionError(f"reward_model {folder}: not a model folder (no config.json or adapter_config.json)")
        if not is_reward_model(folder):
            raise RewardFunctionError(f"reward_model {folder}: not a reward model (train one with stage: rm)")
        scorer = InferenceModel.load(folder, {"device": str(device)} if device is not None else None)
        scorer.model.requires_grad_(False)
        return cls(scorer, batch_size)

    def __call__(self, prompts: list[str], completions: list[str], prompt_messages: Optional[list] = None,
                 **_: Any) -> list[float]:
        if prompt_messages is None:
            prompt_messages = [[{"role": "user", "content": p}] for p in prompts]
        conversations = [[*messages, {"role": "assistant", "content": c}]
                         for messages, c in zip(prompt_messages, completions)]
        return self.scorer.score_conversations(conversations, self.batch_size)
