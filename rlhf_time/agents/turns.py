"""Messages of a rollout with tools: the generated assistant turn and its tool results as messages, and the text a
rollout appends after the generated turn (the tool turns and the next assistant header), rendered by the same chat
template as training (tools= natively, or the Hermes default)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from rlhf_time.agents.calls import ParseError, Style, ToolCall
from rlhf_time.data.tokenize import END_OF_TURN_MARKERS
from rlhf_time.data.tool_render import render_messages
from rlhf_time.errors import RlhfTimeError


def assistant_message(text: str, calls: Sequence[Union[ToolCall, ParseError]], style: Style) -> dict[str, Any]:
    """The generated turn as a message: its text outside the calls as content, the calls that parsed as tool_calls
    (OpenAI layout), so the template renders it as training data would be."""
    if style == "hermes":
        content = text
        while "<tool_call>" in content:
            start = content.index("<tool_call>")
            end = content.find("</tool_call>", start)
            content = content[:start] + (content[end + len("</tool_call>"):] if end >= 0 else "")
        content = content.strip()
    else:
        content = "" if calls else text
    message: dict[str, Any] = {"role": "assistant", "content": content}
    parsed = [call for call in calls if isinstance(call, ToolCall)]
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
