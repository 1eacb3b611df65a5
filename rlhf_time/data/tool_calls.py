"""Tool-use records, checked and normalised to OpenAI's layout: a record's `tools` as
{"type": "function", "function": {"name", "description", "parameters"}}, an assistant turn's calls as
{"type": "function", "function": {"name", "arguments": {...}}}, and {"role": "tool", "content"} turns that answer
them (sharegpt's function_call / observation turns become the same)."""

from __future__ import annotations

import json
from typing import Any, Optional

from rlhf_time.data.readers import Record
from rlhf_time.errors import RlhfTimeError


def record_tools(record: Record) -> Optional[list[dict[str, Any]]]:
    """The record's `tools` (a list of JSON schemas, or that list as a JSON string as LLaMA-Factory writes it), each
    as {"type": "function", "function": {...}}; None when the record has none."""
    value = record.data.get("tools")
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RlhfTimeError(f"{record.location}: field 'tools' is a string but not JSON ({error.msg})") from None
    if not isinstance(value, list):
        raise RlhfTimeError(f"{record.location}: field 'tools' must be a list of function schemas, "
                            f"got {json.dumps(value)[:40]}")
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RlhfTimeError(f"{record.location}: tools[{index}] needs a 'name' "
                                f"(a schema {{name, description, parameters}} or {{type: function, function: {{...}}}})")
        tools.append({"type": "function", "function": function})
    return tools


def tool_names(tools: Optional[list[dict[str, Any]]]) -> set[str]:
    return {tool["function"]["name"] for tool in tools or []}


def tool_calls(record: Record, where: str, value: Any) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls`, each {"type": "function", "function": {"name", "arguments": dict}} (plus
    its "id" when given); arguments given as a JSON string are parsed."""
    if not isinstance(value, list) or not value:
        raise RlhfTimeError(f"{record.location}: {where} must be a non-empty list of calls, got {json.dumps(value)[:40]}")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RlhfTimeError(f"{record.location}: {where}[{index}] needs a function 'name'")
        normalised = {"type": "function", "function": {
            "name": function["name"], "arguments": _arguments(record, f"{where}[{index}]", function.get("arguments"))}}
        if isinstance(call.get("id"), str):
            normalised["id"] = call["id"]
        calls.append(normalised)
    return calls


def sharegpt_calls(record: Record, where: str, value: Any) -> list[dict[str, Any]]:
    """The calls of a sharegpt function_call turn: a JSON {"name", "arguments"} (or a list of them for parallel
    calls), given as a string or as the object itself."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RlhfTimeError(f"{record.location}: {where} is not a JSON function call ({error.msg})") from None
    return tool_calls(record, where, value if isinstance(value, list) else [value])


def _arguments(record: Record, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise RlhfTimeError(f"{record.location}: {where}.arguments is not JSON ({error.msg}: {value[:40]!r})") from None
    if not isinstance(value, dict):
        raise RlhfTimeError(f"{record.location}: {where}.arguments must be a JSON object, got {json.dumps(value)[:40]}")
    return value


def check_tool_turns(record: Record, key: str, messages: list[dict[str, Any]]) -> None:
    """Each tool turn answers one call of the assistant turn before its run of tool turns (the k-th tool turn of a
    run, the k-th call); a tool turn without a `name` gets its call's name."""
    calls: list[dict[str, Any]] = []
    answered = 0
    for index, message in enumerate(messages):
        if message["role"] != "tool":
            calls, answered = message.get("tool_calls", []), 0
            continue
        if answered >= len(calls):
            what = "a preceding tool call" if not calls else f"a call to answer (the turn before made {len(calls)})"
            raise RlhfTimeError(f"{record.location}: {key}[{index}] is a tool turn without {what}")
        message.setdefault("name", calls[answered]["function"]["name"])
        answered += 1


def unknown_tool_calls(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]]) -> list[str]:
    """Names of the calls in a conversation to tools that its `tools` do not list (data may omit schemas, so this
    is a warning, not an error)."""
    known = tool_names(tools)
    return [call["function"]["name"] for message in messages for call in message.get("tool_calls", [])
            if call["function"]["name"] not in known]
