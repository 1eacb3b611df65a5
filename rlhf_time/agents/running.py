"""Running one tool call: every failure (a call that did not parse, an unknown tool, arguments that are not JSON,
an exception, a timeout, a result that is neither a string nor JSON) is an "error: ..." result the model sees, not
an exception in the rollout."""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional, Union

from rlhf_time.agents.calls import ParseError, ToolCall


def run_tool_call(call: Union[ToolCall, ParseError], tools_by_name: dict[str, Callable],
                  timeout: Optional[float] = None) -> tuple[str, bool]:
    """(content of the tool turn, failed). The result is the function's string, or its value as JSON.

    timeout: seconds; a call still running then is abandoned (its thread is a daemon: tools must be deterministic
    functions without side effects that matter, so nothing waits for it)."""
    if isinstance(call, ParseError):
        return _error(call.reason)
    function = tools_by_name.get(call.name)
    if function is None:
        return _error(f"unknown tool {call.name!r}; available: {', '.join(sorted(tools_by_name)) or 'none'}")
    arguments: Any = call.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return _error(f"the arguments of {call.name!r} are not JSON ({error.msg})")
    if not isinstance(arguments, dict):
        return _error(f"the arguments of {call.name!r} are not a JSON object")
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(**arguments)
        except BaseException as error:  # the model's call failed, not the rollout
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return _error(f"{call.name} timed out after {timeout:g} s")
    if "error" in outcome:
        error = outcome["error"]
        return _error(f"{call.name} raised {type(error).__name__}: {error}")
    value = outcome["value"]
    if isinstance(value, str):
        return value, False
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False), False
    except (TypeError, ValueError):
        return _error(f"{call.name} returned a {type(value).__name__}, neither a string nor JSON-serialisable")


def _error(reason: str) -> tuple[str, bool]:
    return "error: " + " ".join(reason.split()), True
