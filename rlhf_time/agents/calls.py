"""The tool calls in a generated assistant turn, in the format of the model's chat template: Hermes
(`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, Qwen and the default for templates without tool
support) or Llama 3 (the turn is one JSON `{"name": ..., "parameters": {...}}`). A call that does not parse is a
ParseError entry, not an exception: a rollout scores it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from rlhf_time.data.tool_render import render_messages, supports_tools
from rlhf_time.errors import RlhfTimeError

Style = Literal["hermes", "llama3"]
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PROBE = "rlhf_time_style_probe"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParseError:
    """A call the model wrote that could not be read: its text and why."""

    text: str
    reason: str


def tool_call_style(tokenizer) -> Style:
    """How the tokenizer's chat template writes calls: "hermes" (also the default for templates without tool
    support) or "llama3"; found once by rendering a probe call."""
    if not supports_tools(tokenizer):
        return "hermes"
    schema = {"type": "function", "function": {"name": _PROBE, "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
    question = [{"role": "user", "content": "x"}]
    called = question + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": _PROBE, "arguments": {"n": 1}}}]}]
    prompt = render_messages(tokenizer, question, [schema], add_generation_prompt=True)
    full = render_messages(tokenizer, called, [schema])
    reply = full[len(prompt):] if full.startswith(prompt) else full
    if "<tool_call>" in reply:
        return "hermes"
    if '"parameters"' in reply and _PROBE in reply:
        return "llama3"
    raise RlhfTimeError(f"the chat template writes tool calls in a format rlhf_time cannot parse (neither Hermes "
                        f"<tool_call> JSON nor Llama-3 JSON with 'parameters'): {reply.strip()[:80]!r}")


def parse_tool_calls(text: str, style: Style) -> list[Union[ToolCall, ParseError]]:
    """The calls in an assistant turn's text (special tokens removed), in order; [] when it calls nothing."""
    if style == "hermes":
        calls: list[Union[ToolCall, ParseError]] = [_call(body.strip(), "arguments") for body in _HERMES_CALL.findall(text)]
        tail = _HERMES_CALL.sub("", text)
        if "<tool_call>" in tail:
            calls.append(ParseError(tail[tail.index("<tool_call>"):], "a <tool_call> without </tool_call>"))
        return calls
    if style == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        return [_call(body, "parameters")] if body.startswith("{") else []
    raise RlhfTimeError(f"unknown tool-call style {style!r}; expected hermes or llama3")


def _call(body: str, arguments_key: str) -> Union[ToolCall, ParseError]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ParseError(body, f"the call is not JSON ({error.msg} at character {error.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return ParseError(body, "the call is not a JSON object with a 'name'")
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return ParseError(body, f"the arguments of {value['name']!r} are not JSON ({error.msg})")
    if not isinstance(arguments, dict):
        return ParseError(body, f"the arguments of {value['name']!r} are not a JSON object")
    return ToolCall(value["name"], arguments)
