"""Messages of a rollout with tools: the generated assistant turn and its tool results as messages, and the text a
rollout appends after the generated turn (the tool turns and the next assistant header), rendered by the same chat
template as training (tools= natively, or the Hermes default)."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Sequence, Union

from rlhf_time.agents.calls import _HERMES_CALL, ParseError, Style, ToolCall, _call
from rlhf_time.data.tokenize import end_of_turn_markers
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


def text_after_turn(render: Callable[..., str], context: list[dict[str, Any]], assistant: dict[str, Any],
                    replies: list[dict[str, Any]], end_markers: Sequence[str]) -> str:
    """The text the chat template puts after the assistant turn's end-of-turn marker: the replies (tool turns, an
    environment's message) and the next generation prompt (e.g. "\\n<|im_start|>user\\n<tool_response>...
    <|im_start|>assistant\\n" in ChatML). Appended to a rollout's tokens, it continues the training layout.
    `render(messages, add_generation_prompt=)` is the chat template."""
    before = render([*context, assistant], add_generation_prompt=False)
    after = render([*context, assistant, *replies], add_generation_prompt=True)
    cut = max((before.rfind(m) + len(m) for m in end_markers if m and m in before), default=len(before))
    if not after.startswith(before[:cut]):
        raise RlhfTimeError("the chat template renders a conversation's beginning differently once replies follow "
                            "(it rewrites earlier turns), so a multi-turn episode cannot continue the sampled tokens")
    return after[cut:]


def render_tool_turns(tokenizer, messages: list[dict[str, Any]], tool_messages: list[dict[str, Any]],
                      tools: Optional[list] = None) -> str:
    """text_after_turn for a conversation ending with the assistant turn that made the calls, rendered by the
    tokenizer's template (tools natively or in the Hermes default)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise RlhfTimeError("render_tool_turns: the conversation must end with the assistant turn that made the calls")
    render = functools.partial(render_messages, tokenizer, tools=tools)
    return text_after_turn(render, messages[:-1], messages[-1], tool_messages, end_of_turn_markers(tokenizer))
