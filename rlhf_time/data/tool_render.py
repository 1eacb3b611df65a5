"""How tool-use conversations reach a chat template: as they are (with `tools=`) when the template renders tool
calls and tool turns itself, else as plain-content messages in the Hermes / Qwen layout (the default), which any
template renders:

- the tools are listed in the system message (after its own text and a blank line, if it has one):
  HERMES_TOOLS_HEADER, then one JSON schema per line, then HERMES_TOOLS_FOOTER;
- each call is appended to its assistant turn's content as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  (a newline before each call, except a first call with no text before it);
- each run of consecutive tool turns becomes one user turn of `<tool_response>\\n...\\n</tool_response>` blocks, one
  per line.

docs/data.md ("Tool-use conversations") shows it literally.
"""

from __future__ import annotations

import json
from typing import Any, Optional

HERMES_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                       "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                       "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                       '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_PROBE_NAME, _PROBE_RESULT = "rlhf_time_probe_tool", "rlhf_time_probe_result"
_native_support: dict[str, bool] = {}  # chat template source -> whether it renders tool calls itself


def uses_tools(messages: list[dict[str, Any]], tools: Optional[list] = None) -> bool:
    """Whether a conversation has tools, tool calls or tool turns."""
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def hermes_call(call: dict[str, Any]) -> str:
    """One call in the Hermes layout: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
    function = call.get("function", call)
    payload = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def hermes_tools_block(tools: list[dict[str, Any]]) -> str:
    return HERMES_TOOLS_HEADER + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + HERMES_TOOLS_FOOTER


def hermes_messages(messages: list[dict[str, Any]], tools: Optional[list] = None) -> list[dict[str, str]]:
    """The conversation as plain {"role", "content"} messages in the Hermes / Qwen layout (module docstring)."""
    plain: list[dict[str, str]] = []
    if tools:
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"] + "\n\n", messages[1:]
        else:
            system = ""
        plain.append({"role": "system", "content": system + hermes_tools_block(tools)})
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if plain and plain[-1].get("from_tool"):
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block, "from_tool": True})
            continue
        content = message["content"]
        for call in message.get("tool_calls", []):
            content += ("\n" if content else "") + hermes_call(call)
        plain.append({"role": message["role"], "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in plain]


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself: its source mentions tools and a probe
    conversation renders the call's name in the assistant turn and the tool's result. Cached per template."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return False
    if template not in _native_support:
        _native_support[template] = "tool" in template and _renders_probe(tokenizer)
    return _native_support[template]


def _renders_probe(tokenizer) -> bool:
    schema = {"type": "function", "function": {"name": _PROBE_NAME, "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
    question = {"role": "user", "content": "x"}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}]}
    result = {"role": "tool", "content": _PROBE_RESULT, "name": _PROBE_NAME}
    try:
        without_call = tokenizer.apply_chat_template([question, {"role": "assistant", "content": ""}],
                                                     tools=[schema], tokenize=False)
        with_call = tokenizer.apply_chat_template([question, call, result], tools=[schema], tokenize=False)
    except Exception:  # a template that raises on tool turns or tool_calls does not support them
        return False
    return with_call.count(_PROBE_NAME) > without_call.count(_PROBE_NAME) and _PROBE_RESULT in with_call


def template_messages(tokenizer, messages: list[dict[str, Any]],
                      tools: Optional[list] = None) -> tuple[list[dict[str, Any]], Optional[list]]:
    """(messages, tools) to pass to the tokenizer's chat template: as given when it renders tools itself, else the
    Hermes layout as plain messages and no tools."""
    if not uses_tools(messages, tools) or supports_tools(tokenizer):
        return messages, tools or None
    return hermes_messages(messages, tools), None


def render_messages(tokenizer, messages: list[dict[str, Any]], tools: Optional[list] = None, *,
                    add_generation_prompt: bool = False) -> str:
    """The conversation's text by the tokenizer's chat template, tools rendered natively or in the Hermes layout."""
    messages, tools = template_messages(tokenizer, messages, tools)
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
