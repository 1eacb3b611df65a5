"""Calling functions concurrently: `async def` ones on one event loop (at most `concurrency` calls in flight),
plain ones in a pool of `workers` threads, each call bounded by `timeout` seconds. RewardScorer uses it for slow
reward functions (an API judge, a sandbox): four functions that each wait 1 s take about 1 s, not 4 s.

A plain function that times out keeps running in its thread until it returns (Python cannot stop a thread); its
result is dropped. An async one is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from typing import Any, Callable, Optional

TIMED_OUT = object()  # the result of a call that took longer than the timeout


def is_async(fn: Callable) -> bool:
    """An `async def` function, or a callable object whose __call__ is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


Call = tuple[Callable, tuple, dict]  # (function, positional arguments, keyword arguments)


def call_all(calls: list[Call], *, concurrency: int = 16, workers: int = 1, timeout: Optional[float] = None) -> list[Any]:
    """fn(*args, **kwargs) of every call, all at once: each one's result, TIMED_OUT, or the exception it raised
    (returned, not raised), in the calls' order."""
    coroutine = _call_all(calls, concurrency, workers, timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no event loop in this thread
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # called from inside a loop (e.g. a notebook)
        return thread.submit(asyncio.run, coroutine).result()


async def _call_all(calls: list[Call], concurrency, workers, timeout) -> list[Any]:
    in_flight = asyncio.Semaphore(concurrency)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="reward")
    loop = asyncio.get_running_loop()

    async def call(fn: Callable, args: tuple, kwargs: dict) -> Any:
        async with in_flight:
            try:
                pending = fn(*args, **kwargs) if is_async(fn) else loop.run_in_executor(
                    pool, functools.partial(fn, *args, **kwargs))
                return await asyncio.wait_for(pending, timeout)
            except asyncio.TimeoutError:
                return TIMED_OUT
            except Exception as error:  # noqa: BLE001 - handed back to the caller, which names the function
                return error

    try:
        return list(await asyncio.gather(*(call(fn, args, kwargs) for fn, args, kwargs in calls)))
    finally:
        pool.shutdown(wait=False)
