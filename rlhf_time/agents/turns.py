"""Messages of a rollout with tools: the generated assistant turn and its tool results as messages, and the text a
rollout appends after the generated turn (the tool turns and the next assistant header), rendered by the same chat
template as training (tools= natively, or the Hermes default)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import re

from rlhf_time.agents.calls import _HERMES_CALL, ParseError, Style, ToolCall, _call
from rlhf_time.data.tokenize import END_OF_TURN_MARKERS
from rlhf_time.data.tool_render import render_messages
from rlhf_time.errors import RlhfTimeError


def assistant_message(text: str, calls: Sequence[Union[ToolCall, ParseError]], style: Style) -> dict[str, Any]:
    """The generated turn as a message: the calls that parsed as tool_calls (OpenAI layout), so the template renders
    it as training data would be, and everything else as content -- a call that did not parse stays in the text,
    as the model wrote it (the trajectory shows what the model did; the error turn that follows says why)."""
    parsed = [call for call in calls if isinstance(call, ToolCall)]
    if style == "hermes":
        def drop_parsed(match: re.Match) -> str:
            return "" if isinstance(_call(match.group(1).strip(), "arguments"), ToolCall) else match.group(0)

        content = _HERMES_CALL.sub(drop_parsed, text).strip()
    else:
        content = "" if parsed else text
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parsed:
        message["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in parsed]
    return message


def tool_result_messages(calls: Sequence[Union[ToolCall, ParseError]], contents: Sequence[str]) -> list[dict[str, Any]]:
    """One {"role": "tool", "content", "name"} turn per call, in order (a call that did not parse has no name)."""
    if len(calls) != len(contents):
        raise ValueError(f"{len(calls)} calls but {len(contents)} results")
    return [{"role": "tool", "content": content, **({"name": call.name} if isinstance(call, ToolCall) else {})}
            for call, content in zip(calls, contents)]


def render_tool_turns(tokenizer, messages: list[dict[str, Any]], tool_messages: list[dict[str, Any]],
                      tools: Optional[list] = None) -> str:
    """The text that follows the end-of-turn token of the last (assistant) message: the tool turns, then the
    header the next assistant turn is generated after. Appended to a rollout's tokens, it continues the same
    layout as training renders the whole conversation."""
    if not messages or messages[-1]["role"] != "assistant":
        raise RlhfTimeError("render_tool_turns: the conversation must end with the assistant turn that made the calls")
    done = render_messages(tokenizer, messages, tools)
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    markers += [m for m in END_OF_TURN_MARKERS if m not in markers]
    cut = next((done.rfind(m) + len(m) for m in markers if m in done), len(done))
    full = render_messages(tokenizer, [*messages, *tool_messages], tools, add_generation_prompt=True)
    if not full.startswith(done[:cut]):
        raise RlhfTimeError("the chat template renders a conversation's beginning differently from the whole "
                            "conversation (it rewrites earlier turns), so tool turns cannot be appended to a rollout")
    return full[cut:]
