"""Record formats -> conversations (lists of {"role", "content"}), preference pairs or unpaired examples."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from rlhf_time.data.readers import Record, field_list
from rlhf_time.data.tool_calls import check_tool_turns, record_tools, sharegpt_calls, tool_calls
from rlhf_time.errors import RlhfTimeError

ROLES = ("system", "user", "assistant")
# With LLaMA-Factory's tool turns: function_call (a JSON {"name", "arguments"}) and observation (the tool's result).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Keys that identify each format, in detection order.
FORMAT_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
}

Messages = list[dict[str, Any]]  # {"role", "content"}, plus "tool_calls" / "name" / "tool_call_id" in tool use


@dataclass(frozen=True)
class PreferencePair:
    prompt_messages: Messages
    chosen: str
    rejected: str
    margin: float = math.nan


@dataclass(frozen=True)
class UnpairedExample:
    """One completion with a thumbs-up (desirable) or thumbs-down label: KTO's data."""

    prompt_messages: Messages
    completion: str
    desirable: bool


def detect_format(record: Record, configured: str = "auto") -> str:
    """The configured format, or the first whose identifying keys the record has."""
    if configured != "auto":
        return configured
    for name, keys in FORMAT_KEYS.items():
        if all(key in record.data for key in keys):
            return name
    # Partial matches: pick the likely format so the error names the field that is missing.
    if "prompt" in record.data and ("chosen" in record.data or "rejected" in record.data):
        return "preference"
    if "prompt" in record.data and ("completion" in record.data or "label" in record.data):
        return "unpaired"
    if "instruction" in record.data:
        return "alpaca"
    if "prompt" in record.data:
        return "prompt_response"
    raise RlhfTimeError(
        f"{record.location}: cannot tell the record format from its fields ({field_list(record.data)}); "
        f"expected one of: prompt/response, messages, instruction/input/output, conversations, prompt/chosen/rejected"
    )


def to_messages(record: Record, fmt: str) -> Messages:
    """The conversation a record describes, validated (ends with at least one assistant turn)."""
    if fmt == "prompt_response":
        messages = []
        if record.data.get("system"):
            messages.append({"role": "system", "content": _text(record, "system")})
        messages += [{"role": "user", "content": _text(record, "prompt")},
                     {"role": "assistant", "content": _text(record, "response")}]
    elif fmt == "alpaca":
        prompt = _text(record, "instruction")
        extra = record.data.get("input")
        if extra:
            prompt += "\n\n" + _text(record, "input")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    elif fmt == "messages":
        messages = _message_list(record, "messages", "role", "content", {r: r for r in (*ROLES, "tool")}, True)
        record_tools(record)  # checked here, read again by the builders
    elif fmt == "sharegpt":
        messages = _message_list(record, "conversations", "from", "value", SHAREGPT_ROLES, True)
        record_tools(record)
    elif fmt == "preference":
        raise RlhfTimeError(f"{record.location}: a preference pair (prompt/chosen/rejected) needs stage rm, dpo or kto")
    elif fmt == "unpaired":
        raise RlhfTimeError(f"{record.location}: an unpaired example (prompt/completion/label) needs stage kto")
    else:
        raise RlhfTimeError(f"unknown data_format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RlhfTimeError(f"{record.location}: conversation has no assistant turn to train on")
    return messages


def to_preference(record: Record) -> PreferencePair:
    """A {"prompt", "chosen", "rejected"[, "margin"]} record; prompt may be a string or a messages list."""
    data = record.data
    for key in ("prompt", "chosen", "rejected"):
        if key not in data:
            raise RlhfTimeError(f"{record.location}: missing field {key!r} (record has: {field_list(data)})")
    prompt = _prompt_messages(record)
    margin = data.get("margin")
    if margin in (None, ""):
        margin = math.nan
    else:
        try:
            if isinstance(margin, bool):
                raise TypeError
            margin = float(margin)
        except (TypeError, ValueError):
            raise RlhfTimeError(f"{record.location}: field 'margin' must be a number, got {margin!r}") from None
    return PreferencePair(prompt, _reply(record, "chosen"), _reply(record, "rejected"), margin)


def to_unpaired(record: Record) -> UnpairedExample:
    """A {"prompt", "completion", "label": true|false} record (TRL's unpaired preference format); prompt may be a
    string or a messages list, completion a string or one assistant message."""
    data = record.data
    for key in ("prompt", "completion", "label"):
        if key not in data:
            raise RlhfTimeError(f"{record.location}: missing field {key!r} (record has: {field_list(data)})")
    label = data["label"]
    if not isinstance(label, bool):
        raise RlhfTimeError(f"{record.location}: field 'label' must be true or false, got {json.dumps(label)[:40]}")
    return UnpairedExample(_prompt_messages(record), _reply(record, "completion"), label)


def unpair(pair: PreferencePair) -> tuple[UnpairedExample, UnpairedExample]:
    """A preference pair as one desirable (chosen) and one undesirable (rejected) example."""
    return (UnpairedExample(pair.prompt_messages, pair.chosen, True),
            UnpairedExample(pair.prompt_messages, pair.rejected, False))


def _prompt_messages(record: Record) -> Messages:
    if isinstance(record.data["prompt"], list):
        return _message_list(record, "prompt", "role", "content", {r: r for r in ROLES})
    return [{"role": "user", "content": _text(record, "prompt")}]


def _reply(record: Record, key: str) -> str:
    """chosen/rejected/completion as a string, or a single assistant message (dict or one-element list)."""
    value = record.data[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise RlhfTimeError(f"{record.location}: field {key!r} must be a string or one assistant message")
        value = value["content"]
    elif isinstance(value, list):
        raise RlhfTimeError(f"{record.location}: field {key!r} must be a string or one assistant message, "
                            f"got a list of {len(value)} (put earlier turns in 'prompt')")
    return _text(record, key, value)


def _text(record: Record, key: str, value: Any = None) -> str:
    if value is None:
        if key not in record.data:
            raise RlhfTimeError(
                f"{record.location}: missing field {key!r} (record has: {field_list(record.data) or 'nothing'})")
        value = record.data[key]
    if not isinstance(value, str):
        raise RlhfTimeError(f"{record.location}: field {key!r} must be a string, got {json.dumps(value)[:40]}")
    if not value.strip():
        raise RlhfTimeError(f"{record.location}: field {key!r} is empty")
    return value


def _message_list(record: Record, key: str, role_key: str, content_key: str, roles: dict[str, str],
                  with_tools: bool = False) -> Messages:
    """The turns of record[key]; with_tools: tool turns and assistant tool_calls too (sharegpt's function_call and
    observation turns mapped onto them), checked (see tool_calls.py)."""
    turns = record.data.get(key)
    if not isinstance(turns, list) or not turns:
        raise RlhfTimeError(f"{record.location}: field {key!r} must be a non-empty list of messages")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        calls = turn.get("tool_calls") if with_tools and isinstance(turn, dict) else None
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and calls is None):
            raise RlhfTimeError(f"{record.location}: {where} needs {role_key!r} and {content_key!r}")
        given_role = str(turn[role_key]).lower()
        role = roles.get(given_role)
        if role is None:
            raise RlhfTimeError(f"{record.location}: {where} has unknown {role_key} {turn[role_key]!r}; "
                                f"allowed: {', '.join(roles)}")
        if given_role == "function_call":  # sharegpt: the value is the call itself
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": sharegpt_calls(record, f"{where}.{content_key}", turn[content_key])})
            continue
        content = turn.get(content_key)
        if role == "assistant" and calls is not None and content is None:
            content = ""
        if not isinstance(content, str):
            raise RlhfTimeError(f"{record.location}: {where}.{content_key} must be a string, got {json.dumps(content)[:40]}")
        if role not in ("system", "tool") and calls is None and not content.strip():
            raise RlhfTimeError(f"{record.location}: {where}.{content_key} is empty")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and calls is not None:
            message["tool_calls"] = tool_calls(record, f"{where}.tool_calls", calls)
        if role == "tool":
            message.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
        messages.append(message)
    if with_tools:
        check_tool_turns(record, key, messages)
    return messages


def prompt_of(record: Record) -> str:
    """The prompt text of a record of any format (for `rlhf-time predict`)."""
    data = record.data
    if isinstance(data.get("prompt"), str):
        return _text(record, "prompt")
    if "instruction" in data:
        prompt = _text(record, "instruction")
        return prompt + "\n\n" + _text(record, "input") if data.get("input") else prompt
    for key, role_key, content_key in (("prompt", "role", "content"), ("messages", "role", "content"),
                                       ("conversations", "from", "value")):
        turns = data.get(key)
        if isinstance(turns, list):
            users = [t.get(content_key) for t in turns if isinstance(t, dict) and str(t.get(role_key)).lower() in ("user", "human")]
            if users and isinstance(users[-1], str) and users[-1].strip():
                return users[-1]
            raise RlhfTimeError(f"{record.location}: field {key!r} has no user message to use as the prompt")
    raise RlhfTimeError(f"{record.location}: no prompt in this record: expected 'prompt', 'instruction' or a messages "
                        f"list (record has: {field_list(data) or 'nothing'})")
