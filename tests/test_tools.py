"""The tool-calling building blocks (rlhf_time.agents): schemas, loading, parsing calls, running them with each
failure kind, the tool turns a rollout appends, and the example agent rewards (examples/agent_rewards.py)."""

import json
import math
import time
from copy import deepcopy
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf_time.agents import (ParseError, ToolCall, assistant_message, load_tools, parse_tool_calls, render_tool_turns,
                              run_tool_call, tool_call_style, tool_result_messages, tool_schema, tools_by_name)
from rlhf_time.data.tokenize import ConversationEncoder
from rlhf_time.errors import RlhfTimeError
from tests.data.test_tool_data import LLAMA31_TOOL_TEMPLATE, QWEN3_TOOL_TEMPLATE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MULTIPLY_SCHEMA = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first factor."},
                                                    "b": {"type": "integer", "description": "The second factor."}},
                   "required": ["a", "b"]},
    "return": {"type": "integer", "description": "The product a * b."}}}


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizer, llama_model_dir):
    qwen3 = deepcopy(tiny_tokenizer)
    qwen3.chat_template = QWEN3_TOOL_TEMPLATE
    llama31 = AutoTokenizer.from_pretrained(llama_model_dir)
    llama31.chat_template = LLAMA31_TOOL_TEMPLATE
    return {"tiny": tiny_tokenizer, "qwen3": qwen3, "llama31": llama31}


# ------------------------------------------------------------------------------------------ schemas
def test_schema_of_the_example_tool_is_what_the_example_data_lists():
    (tool,) = load_tools(["tools.py:multiply"], base_dir=EXAMPLES)
    assert tool(123, 456) == 56088
    assert tool_schema(tool) == MULTIPLY_SCHEMA
    first = json.loads((EXAMPLES / "data" / "agent_sft.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["tools"] == [MULTIPLY_SCHEMA]


def no_docstring(a: int) -> int:
    return a


def no_args_section(a: int) -> int:
    """Does something."""
    return a


def no_type_hint(a):
    """Does something.

    Args:
        a: A number.
    """
    return a


@pytest.mark.parametrize("function, words", [
    (no_docstring, ["tool 'no_docstring'", "no docstring"]),
    (no_args_section, ["tool 'no_args_section'", "no description for the argument 'a'"]),
    (no_type_hint, ["tool 'no_type_hint'", "missing a type hint"]),
])
def test_schema_errors_name_the_function_in_one_line(function, words):
    with pytest.raises(RlhfTimeError) as error:
        tool_schema(function)
    assert "\n" not in str(error.value) and "Args:" in str(error.value)
    for word in words:
        assert word in str(error.value)


# ------------------------------------------------------------------------------------------ loading
def test_load_tools_from_a_file_next_to_the_yaml_an_import_string_and_a_callable(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "my_tools.py").write_text("def search(query: str) -> str:\n    return 'found ' + query\n")
    monkeypatch.chdir(tmp_path)  # the file is found next to the YAML, not in the working directory
    search, gcd, own = load_tools(["my_tools.py:search", "math:gcd", multiply], base_dir=folder)
    assert search("x") == "found x" and gcd(12, 18) == 6 and own is multiply
    assert list(tools_by_name([search, gcd, own])) == ["search", "gcd", "multiply"]


@pytest.mark.parametrize("spec, words", [
    ("missing.py:f", ["tool 'missing.py:f': cannot import 'missing.py' (FileNotFoundError"]),
    ("math:no_such", ["tool 'math:no_such': module 'math' has no attribute 'no_such'"]),
    ("math:pi", ["'pi' is a float, not a function"]),
    ("just_a_name", ["tool 'just_a_name': expected an import string"]),
])
def test_load_tools_errors(tmp_path, spec, words):
    with pytest.raises(RlhfTimeError) as error:
        load_tools([spec], base_dir=tmp_path)
    for word in words:
        assert word in str(error.value)


def test_two_tools_with_one_name_are_an_error():
    with pytest.raises(RlhfTimeError, match="two functions are named 'multiply'"):
        load_tools([multiply, multiply])


# ------------------------------------------------------------------------------------------ parsing
def test_hermes_calls_are_parsed_in_order_with_errors_as_entries():
    text = ('Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
            '<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}\n</tool_call>\n'
            '<tool_call>\n{"name": "multiply", "arguments": {"a": 5,}}\n</tool_call>\n'
            '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "multiply", "arguments": [1]}</tool_call>'
            '<tool_call>\n{"name": "multiply"')
    calls = parse_tool_calls(text, "hermes")
    assert calls[:2] == [ToolCall("multiply", {"a": 3, "b": 4}), ToolCall("multiply", {"a": 5, "b": 6})]
    assert [type(c) for c in calls[2:]] == [ParseError] * 4
    assert calls[2].reason.startswith("the call is not JSON") and calls[2].text == '{"name": "multiply", "arguments": {"a": 5,}}'
    assert calls[3].reason == "the call is not a JSON object with a 'name'"
    assert calls[4].reason == "the arguments of 'multiply' are not a JSON object"
    assert calls[5].reason == "a <tool_call> without </tool_call>"
    assert parse_tool_calls("The answer is 12.", "hermes") == []
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>', "hermes") == [ToolCall("f", {})]


def test_llama3_calls():
    assert parse_tool_calls(' {"name": "multiply", "parameters": {"a": 3, "b": 4}}', "llama3") == [
        ToolCall("multiply", {"a": 3, "b": 4})]
    assert parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {}}', "llama3") == [ToolCall("f", {})]
    assert parse_tool_calls("12", "llama3") == []
    (broken,) = parse_tool_calls('{"name": "multiply", "parameters": {"a": 3', "llama3")
    assert isinstance(broken, ParseError) and "not JSON" in broken.reason
    with pytest.raises(RlhfTimeError, match="unknown tool-call style 'xml'"):
        parse_tool_calls("", "xml")


def test_style_is_read_from_the_template(tokenizers):
    assert {name: tool_call_style(t) for name, t in tokenizers.items()} == {
        "tiny": "hermes", "qwen3": "hermes", "llama31": "llama3"}


# ------------------------------------------------------------------------------------------ running
def slow(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def boom() -> str:
    raise KeyError("x")


TOOLS = {"multiply": multiply, "slow": slow, "boom": boom, "echo": lambda text: text,
         "nan": lambda: math.nan, "obj": lambda: object(), "listing": lambda: {"items": [1, "é"]}}


@pytest.mark.parametrize("call, expected", [
    (ToolCall("multiply", {"a": 3, "b": 4}), ("12", False)),
    (ToolCall("echo", {"text": "plain"}), ("plain", False)),
    (ToolCall("listing"), ('{"items": [1, "é"]}', False)),
    (ToolCall("boom"), ("error: boom raised KeyError: 'x'", True)),
    (ToolCall("multiply", {"a": 3, "c": 4}), ("error: multiply raised TypeError: multiply() got an unexpected keyword "
                                              "argument 'c'", True)),
    (ToolCall("divide", {"a": 1}), ("error: unknown tool 'divide'; available: boom, echo, listing, multiply, nan, obj, "
                                    "slow", True)),
    (ToolCall("multiply", '{"a": 3, b: 4}'), ("error: the arguments of 'multiply' are not JSON (Expecting property "
                                              "name enclosed in double quotes)", True)),
    (ToolCall("multiply", "[3, 4]"), ("error: the arguments of 'multiply' are not a JSON object", True)),
    (ParseError("{bad", "the call is not JSON (Expecting value at character 1)"),
     ("error: the call is not JSON (Expecting value at character 1)", True)),
    (ToolCall("nan"), ("error: nan returned a float, neither a string nor JSON-serialisable", True)),
    (ToolCall("obj"), ("error: obj returned a object, neither a string nor JSON-serialisable", True)),
])
def test_run_tool_call(call, expected):
    assert run_tool_call(call, TOOLS, timeout=5) == expected


def test_a_call_past_its_timeout_is_an_error_without_waiting():
    start = time.perf_counter()
    assert run_tool_call(ToolCall("slow", {"seconds": 3}), TOOLS, timeout=0.2) == ("error: slow timed out after 0.2 s", True)
    assert time.perf_counter() - start < 1.5
    assert run_tool_call(ToolCall("slow", {"seconds": 0.01}), TOOLS, timeout=2) == ("done", False)


# ------------------------------------------------------------------------------------ rollout turns
def test_assistant_message_and_tool_results():
    text = 'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><tool_call>{x</tool_call>'
    calls = parse_tool_calls(text, "hermes")
    # the call that did not parse stays in the text, as the model wrote it
    assert assistant_message(text, calls, "hermes") == {"role": "assistant", "content": "Let me compute.\n<tool_call>{x</tool_call>", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]}
    results = [run_tool_call(c, TOOLS)[0] for c in calls]
    assert tool_result_messages(calls, results) == [{"role": "tool", "content": "12", "name": "multiply"},
                                                    {"role": "tool", "content": results[1]}]
    assert results[1].startswith("error: the call is not JSON")
    llama_text = '{"name": "multiply", "parameters": {"a": 3, "b": 4}}'
    assert assistant_message(llama_text, parse_tool_calls(llama_text, "llama3"), "llama3")["content"] == ""
    assert assistant_message("12", [], "llama3") == {"role": "assistant", "content": "12"}


EXPECTED_TOOL_TURNS = {
    "tiny": "\n<|im_start|>user\n<tool_response>\n12\n</tool_response>\n<tool_response>\n30\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n",
    "qwen3": "\n<|im_start|>user\n<tool_response>\n12\n</tool_response>\n<tool_response>\n30\n</tool_response><|im_end|>\n"
             "<|im_start|>assistant\n",
    "llama31": "<|start_header_id|>ipython<|end_header_id|>\n\n12<|eot_id|><|start_header_id|>ipython<|end_header_id|>"
               "\n\n30<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", ["tiny", "qwen3", "llama31"])
def test_rollout_text_equals_the_training_layout(tokenizers, name):
    """prompt + generated turn + render_tool_turns(...) is exactly the generation prompt of the whole conversation,
    as training renders it (so a rollout continues the training layout)."""
    tokenizer = tokenizers[name]
    style = tool_call_style(tokenizer)
    tools = [MULTIPLY_SCHEMA]
    question = [{"role": "user", "content": "What is 3*4 and 5*6?"}]
    generated = ('<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "multiply", "arguments": {"a": 5, "b": 6}}\n</tool_call>')
    if style == "llama3":  # one call per turn in Llama 3.1's format
        generated = '{"name": "multiply", "parameters": {"a": 3, "b": 4}}'
    calls = parse_tool_calls(generated, style)
    messages = [*question, assistant_message(generated, calls, style)]
    results = [run_tool_call(c, {"multiply": multiply})[0] for c in calls]
    if style == "llama3":
        results, calls = results + ["30"], calls + [ToolCall("multiply", {"a": 5, "b": 6})]
    tool_messages = tool_result_messages(calls, results)
    appended = render_tool_turns(tokenizer, messages, tool_messages, tools)
    assert appended == EXPECTED_TOOL_TURNS[name]
    encoder = ConversationEncoder(tokenizer)
    end_of_turn = tokenizer.eos_token
    rollout = encoder.generation_prompt(question, tools=tools) + generated + end_of_turn + appended
    assert rollout == encoder.generation_prompt([*messages, *tool_messages], tools=tools)


def test_render_tool_turns_needs_the_assistant_turn_last(tokenizers):
    with pytest.raises(RlhfTimeError, match="must end with the assistant turn"):
        render_tool_turns(tokenizers["tiny"], [{"role": "user", "content": "q"}], [{"role": "tool", "content": "1"}])


def test_the_example_data_generator_reproduces_the_shipped_files(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(EXAMPLES / "data" / "make_agent_data.py"), "--out", str(tmp_path)], check=True,
                   cwd=tmp_path)
    for name in ("agent_sft.jsonl", "agent_prompts.jsonl", "agent_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes(), name
    factors = {}
    for name in ("agent_sft.jsonl", "agent_prompts.jsonl", "agent_eval.jsonl"):
        records = [json.loads(line) for line in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
        questions = [r["messages"][0]["content"] if "messages" in r else r["prompt"] for r in records]
        factors[name] = {tuple(int(w.strip(".?*")) for w in q.split() if w.strip(".?*").isdigit()) for q in questions}
        assert all(len(f) == 2 for f in factors[name]) and len(factors[name]) == len(records)
    assert not (factors["agent_eval.jsonl"] & (factors["agent_sft.jsonl"] | factors["agent_prompts.jsonl"]))


def example_rewards():
    import importlib.util

    spec = importlib.util.spec_from_file_location("agent_rewards", EXAMPLES / "agent_rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    return rewards


def test_the_example_argument_reward_counts_the_question_digits_the_first_call_copies_in_place():
    rewards = example_rewards()

    def episode(arguments):
        calls = [{"type": "function", "function": {"name": "multiply", "arguments": arguments}}] if arguments else []
        return [{"role": "user", "content": "Multiply 499 by 275."},
                {"role": "assistant", "content": "", **({"tool_calls": calls} if calls else {})},
                {"role": "tool", "content": "1"}, {"role": "assistant", "content": "1"}]

    trajectories = [episode({"a": 499, "b": 275}), episode({"a": 494, "b": 275}), episode({"a": 275, "b": 499}),
                    episode({"a": 49, "b": 2750}), episode(None)]
    scores = rewards.right_arguments(["p"] * 5, ["1"] * 5, trajectories=trajectories)
    # right; a's last digit wrong; swapped (no digit in place); 49 and 2750 hold 2 + 3 of 499 and 275 in place; no call
    assert scores == [1.0, 5 / 6, 0.0, 5 / 6, 0.0]


def test_the_example_copy_reward_compares_the_answer_with_the_last_tool_result_not_the_product():
    def episode(result):
        tool = [{"role": "tool", "content": result}] if result is not None else []
        return [{"role": "user", "content": "What is 249 times 218?"}, {"role": "assistant", "content": ""}, *tool]

    scores = example_rewards().copies_result(["p"] * 4, ["54282", "55428", " 5 4282 ", "54282"],
                                             trajectories=[episode("54282"), episode("54282"), episode("54282"),
                                                           episode(None)])
    assert scores == [1.0, 0.0, 1.0, 0.0]  # right copy; a miscopy; spaces ignored; no tool turn
