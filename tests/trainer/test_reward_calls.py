"""Concurrent reward functions (rollout.reward_concurrency / reward_workers / reward_timeout / reward_on_error):
async functions share one event loop, plain ones a thread pool, a late call gives None or stops the run."""

import asyncio
import logging
import time

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.experience.rewards import RewardFunctionError, RewardScorer


def judge(delay: float, name: str):
    """An async reward function shaped like an API judge: it waits `delay` s, then scores each completion."""
    async def score(prompts, completions, **_):
        await asyncio.sleep(delay)
        return [float(len(c)) for c in completions]
    score.__name__ = name
    return score


def scorer(functions, **rollout) -> RewardScorer:
    config = TrainingConfig(stage="grpo", rollout={"reward_funcs": ["exact_match"], **rollout})
    return RewardScorer.from_config(config, reward_funcs=functions)


def test_four_slow_async_judges_take_about_one_call_not_four(capsys):
    start = time.perf_counter()
    totals, per_function = scorer([judge(1.0, f"judge{i}") for i in range(4)])(["p", "q"], ["ab", "c"], {})
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nfour async reward functions of 1 s each: {elapsed:.2f} s for the call")
    assert per_function == [[2.0, 1.0]] * 4 and totals == [8.0, 4.0]
    assert elapsed < 2.0  # one after another they take 4 s


def test_plain_functions_run_in_the_worker_threads():
    def slow(prompts, completions, **_):
        time.sleep(0.5)
        return [1.0] * len(completions)

    functions = [slow, slow, slow, slow]
    start = time.perf_counter()
    assert scorer(functions, reward_workers=4)(["p"], ["c"], {})[0] == [4.0]
    assert time.perf_counter() - start < 1.5  # in turn: 2 s
    start = time.perf_counter()
    assert scorer(functions)(["p"], ["c"], {})[0] == [4.0]  # reward_workers 1: plain calls in turn, as before
    assert time.perf_counter() - start >= 2.0


def test_a_late_call_gives_none_with_one_warning_or_stops_the_run(caplog):
    functions = [judge(0.0, "fast"), judge(3.0, "slow_judge")]
    with caplog.at_level(logging.WARNING, logger="rlhf_time"):
        totals, per_function = scorer(functions, reward_timeout=0.3)(["p"], ["abc"], {})
    assert per_function == [[3.0], [None]] and totals == [3.0]
    warnings = [r.getMessage() for r in caplog.records if "slow_judge" in r.getMessage()]
    assert warnings == ["warning: reward function 'slow_judge' took longer than reward_timeout=0.3 s: its 1 rewards "
                        "are None for this call"]
    with pytest.raises(RewardFunctionError, match="reward function 'slow_judge' took longer than reward_timeout=0.3 s"):
        scorer(functions, reward_timeout=0.3, reward_on_error="stop")(["p"], ["abc"], {})


def test_an_async_function_that_raises_or_returns_junk_names_itself():
    async def broken(prompts, completions, **_):
        raise ValueError("judge offline")

    async def junk(prompts, completions, **_):
        return "yes"

    with pytest.raises(RewardFunctionError, match="reward function 'broken' raised ValueError: judge offline"):
        scorer([broken])(["p"], ["c"], {})
    with pytest.raises(RewardFunctionError, match="reward function 'junk' returned a str"):
        scorer([junk])(["p"], ["c"], {})


def test_the_micro_batches_of_a_step_are_scored_at_once(capsys):
    """A step of 4 micro-batches with one async 1 s judge: about 1 s for the step's scoring, not 4 s."""
    requests = [(["p"], [f"c{i}"], {}) for i in range(4)]
    start = time.perf_counter()
    scored = scorer([judge(1.0, "judge")]).score_many(requests)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nfour micro-batches, one async 1 s judge: {elapsed:.2f} s for the step")
    assert [totals for totals, _ in scored] == [[2.0]] * 4 and elapsed < 2.0
