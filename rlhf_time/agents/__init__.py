"""Tool-calling building blocks shared by SFT data and on-policy rollouts with tools: a function's JSON schema,
tools named in a config, the calls in a generated assistant turn, running them, and the text of the tool turns
that a rollout appends before generating again.

Tools must be deterministic functions of their arguments (docs/data.md, "Tool-use conversations")."""

from rlhf_time.agents.calls import ParseError, ToolCall, parse_tool_calls, tool_call_style
from rlhf_time.agents.running import run_tool_call
from rlhf_time.agents.schema import load_tools, tool_schema, tools_by_name
from rlhf_time.agents.turns import assistant_message, render_tool_turns, text_after_turn, tool_result_messages

__all__ = ["ParseError", "ToolCall", "assistant_message", "load_tools", "parse_tool_calls", "render_tool_turns",
           "run_tool_call", "text_after_turn", "tool_call_style", "tool_result_messages", "tool_schema", "tools_by_name"]
