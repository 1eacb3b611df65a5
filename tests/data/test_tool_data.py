"""Tool-use conversations: formats, sharegpt mapping, rendering by templates with and without tool support, masks
token by token (every assistant turn trained, calls and end-of-turn included; tool results, system and user turns
never), and bad records."""

import json
import logging
from copy import deepcopy

import pytest
from transformers import AutoTokenizer

from rlhf_time import TrainingConfig
from rlhf_time.data import validate_data_file
from rlhf_time.data.tool_render import supports_tools
from rlhf_time.errors import RlhfTimeError
from tests.conftest import LLAMA3_TEMPLATE, write_jsonl
from tests.data.test_tokenize import expected, ids, load
MULTIPLY = {"name": "multiply", "description": "Multiply two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "first"},
                                                            "b": {"type": "integer", "description": "second"}},
                           "required": ["a", "b"]}}
OPENAI_MULTIPLY = {"type": "function", "function": MULTIPLY}

# Qwen3's documented tool format (Hermes): the tools in the system turn, <tool_call> JSON in the assistant turn,
# consecutive tool results merged into one user turn of <tool_response> blocks. Written here from that description.
QWEN3_TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- if not tools %}"
    "{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1's documented JSON tool calling: the tools in the first user turn, the call as
# {"name": ..., "parameters": {...}} after the assistant header, results under role ipython; one call per turn.
LLAMA31_TOOL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- if tools %}{%- set first_user = messages[0].content %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON "
    "for a function call with its proper arguments that best answers the given prompt.\\n\\n"
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}."
    "Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}{{- raise_exception('only single tool calls') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call.name + '\", \"parameters\": ' }}"
    "{{- call.arguments | tojson }}{{- '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# What Qwen3 writes (and the Hermes default) for the tools: the literal text of docs/data.md.
HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(OPENAI_MULTIPLY) +
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)


def call(a, b, arguments_as_string=False):
    arguments = {"a": a, "b": b}
    return {"type": "function", "function": {"name": "multiply",
                                             "arguments": json.dumps(arguments) if arguments_as_string else arguments}}


TWO_CALLS = {"messages": [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 3*4 and 5*6?"},
    {"role": "assistant", "content": "Let me compute.", "tool_calls": [call(3, 4), call(5, 6, True)]},
    {"role": "tool", "content": "12"}, {"role": "tool", "content": "30", "tool_call_id": "b"},
    {"role": "assistant", "content": "12 and 30"}], "tools": [MULTIPLY]}
ONE_CALL = {"messages": [
    {"role": "user", "content": "What is 3 times 4?"},
    {"role": "assistant", "tool_calls": [call(3, 4)]},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "12"}], "tools": [OPENAI_MULTIPLY]}


@pytest.fixture(scope="module")
def qwen3_tokenizer(tiny_tokenizer):
    tokenizer = deepcopy(tiny_tokenizer)
    tokenizer.chat_template = QWEN3_TOOL_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def llama31_tokenizer(llama_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    tokenizer.chat_template = LLAMA31_TOOL_TEMPLATE
    return tokenizer


def test_tool_support_is_detected(tiny_tokenizer, qwen3_tokenizer, llama31_tokenizer, llama_model_dir):
    assert not supports_tools(tiny_tokenizer)  # ChatML without tools: the Hermes default
    assert not supports_tools(AutoTokenizer.from_pretrained(llama_model_dir))  # LLAMA3_TEMPLATE
    assert supports_tools(qwen3_tokenizer) and supports_tools(llama31_tokenizer)
    mentions_only = deepcopy(tiny_tokenizer)  # mentions tools but renders no call: not support
    mentions_only.chat_template = "{# tools are ignored #}" + tiny_tokenizer.chat_template
    assert not supports_tools(mentions_only)


@pytest.mark.parametrize("template", ["qwen3 with tools", "tiny ChatML without tools (Hermes default)"])
def test_hermes_layout_masks_token_by_token(tmp_path, tiny_tokenizer, qwen3_tokenizer, template):
    """Qwen3's own tool template and the default for a template without tool support give the same tokens: the
    system turn (with the tools), user turns and the merged tool results are context; both assistant turns, calls
    and <|im_end|> included, are targets."""
    tokenizer = qwen3_tokenizer if template.startswith("qwen3") else tiny_tokenizer
    example = load(tmp_path, tokenizer, [TWO_CALLS])[0]
    assert example == expected(tokenizer, [
        ("<|im_start|>system\nYou are a calculator.\n\n" + HERMES_SYSTEM + "<|im_end|>\n"
         "<|im_start|>user\nWhat is 3*4 and 5*6?<|im_end|>\n<|im_start|>assistant\n", False),
        ('Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
         '<tool_call>\n{"name": "multiply", "arguments": {"a": 5, "b": 6}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n12\n</tool_response>\n<tool_response>\n30\n</tool_response><|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("12 and 30<|im_end|>", True), ("\n", False)])


def test_hermes_default_without_system_message_and_a_call_without_text(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [ONE_CALL])[0]
    assert example == expected(tiny_tokenizer, [
        ("<|im_start|>system\n" + HERMES_SYSTEM + "<|im_end|>\n<|im_start|>user\nWhat is 3 times 4?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n12\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("12<|im_end|>", True), ("\n", False)])


def test_llama31_json_calls_and_ipython_results(tmp_path, llama31_tokenizer):
    example = load(tmp_path, llama31_tokenizer, [ONE_CALL])[0]
    assert example == expected(llama31_tokenizer, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
         "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
         "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
         '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n'
         + json.dumps(OPENAI_MULTIPLY, indent=4) + "\n\nWhat is 3 times 4?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('{"name": "multiply", "parameters": {"a": 3, "b": 4}}<|eot_id|>', True),
        ("<|start_header_id|>ipython<|end_header_id|>\n\n12<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         False),
        ("12<|eot_id|>", True)])
    assert example["labels"][-1] == llama31_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_llama3_without_tool_support_gets_the_hermes_default(tmp_path, llama_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    assert tokenizer.chat_template == LLAMA3_TEMPLATE
    example = load(tmp_path, tokenizer, [ONE_CALL])[0]
    assert example == expected(tokenizer, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + HERMES_SYSTEM + "<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 3 times 4?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|eot_id|>', True),
        ("<|start_header_id|>user<|end_header_id|>\n\n<tool_response>\n12\n</tool_response><|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("12<|eot_id|>", True)])


def test_config_system_prompt_comes_before_the_tools(tmp_path, tiny_tokenizer):
    with_prompt = load(tmp_path, tiny_tokenizer, [ONE_CALL], system_prompt="Be brief.")[0]
    own = deepcopy(ONE_CALL)
    own["messages"].insert(0, {"role": "system", "content": "Be brief."})
    assert with_prompt == load(tmp_path, tiny_tokenizer, [own], name="own.jsonl")[0]
    assert ids(tiny_tokenizer, "<|im_start|>system\nBe brief.\n\n# Tools") == with_prompt["input_ids"][:len(
        ids(tiny_tokenizer, "<|im_start|>system\nBe brief.\n\n# Tools"))]


def test_sharegpt_function_call_and_observation_map_onto_tool_turns(tmp_path, tiny_tokenizer, qwen3_tokenizer):
    """LLaMA-Factory's layout: function_call (JSON {"name", "arguments"}), observation, tools as a JSON string."""
    record = {"conversations": [
        {"from": "human", "value": "What is 3 times 4?"},
        {"from": "function_call", "value": json.dumps({"name": "multiply", "arguments": {"a": 3, "b": 4}})},
        {"from": "observation", "value": "12"},
        {"from": "gpt", "value": "12"}], "tools": json.dumps([MULTIPLY])}
    for tokenizer in (tiny_tokenizer, qwen3_tokenizer):
        assert load(tmp_path, tokenizer, [record])[0] == load(tmp_path, tokenizer, [ONE_CALL], name="m.jsonl")[0]


def test_arguments_as_json_string_equal_arguments_as_object(tmp_path, qwen3_tokenizer):
    as_string = deepcopy(ONE_CALL)
    as_string["messages"][1]["tool_calls"] = [call(3, 4, arguments_as_string=True)]
    bare = {"messages": ONE_CALL["messages"], "tools": [MULTIPLY]}
    reference = load(tmp_path, qwen3_tokenizer, [ONE_CALL], name="r.jsonl")[0]
    dataset = load(tmp_path, qwen3_tokenizer, [as_string, bare])
    assert dataset[0] == reference and dataset[1] == reference


def test_template_rewriting_earlier_turns_is_the_one_line_error(tmp_path, qwen3_tokenizer):
    tokenizer = deepcopy(qwen3_tokenizer)
    tokenizer.chat_template = "{{ messages | length }}" + QWEN3_TOOL_TEMPLATE  # every prefix renders differently
    assert supports_tools(tokenizer)
    with pytest.raises(RlhfTimeError, match=r"^\S*d.jsonl line 1: the chat template renders a conversation's "
                                            r"beginning differently .*set prompt_template"):
        load(tmp_path, tokenizer, [ONE_CALL])


def test_custom_templates_refuse_tool_data(tmp_path, tiny_tokenizer):
    with pytest.raises(RlhfTimeError, match=r"d.jsonl line 1: tool calls and tool turns need the chat template; "
                                            r"prompt_template/response_template cannot lay them out") as error:
        load(tmp_path, tiny_tokenizer, [ONE_CALL], prompt_template="Q: {prompt}\n")
    assert "\n" not in str(error.value)


def test_calls_to_tools_not_listed_are_one_warning_per_file(tmp_path, tiny_tokenizer, caplog):
    unlisted = deepcopy(ONE_CALL)
    unlisted["tools"] = []
    records = [ONE_CALL, unlisted, unlisted, TWO_CALLS]
    with caplog.at_level(logging.WARNING, logger="rlhf_time"):
        dataset = load(tmp_path, tiny_tokenizer, records)
    assert len(dataset) == 4 and dataset.stats.unknown_tool_calls == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "d.jsonl: 2 tool calls name a tool that is not in their record's 'tools' (first: " in warnings[0]
    assert "d.jsonl line 2: 'multiply'" in warnings[0]


def _messages(*turns):
    return json.dumps({"messages": list(turns), "tools": [MULTIPLY]}) + "\n"


USER = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("content, words", [
    (_messages(USER, {"role": "tool", "content": "12"}, ANSWER),
     ["a.jsonl line 1: messages[1] is a tool turn without a preceding tool call"]),
    (_messages(USER, {"role": "assistant", "tool_calls": [call(1, 2)]}, {"role": "tool", "content": "2"},
               {"role": "tool", "content": "3"}, ANSWER),
     ["a.jsonl line 1: messages[3] is a tool turn without a call to answer (the turn before made 1)"]),
    (_messages(USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": "{a: 1}"}}]}, ANSWER),
     ["a.jsonl line 1: messages[1].tool_calls[0].arguments is not JSON (", "{a: 1}"]),
    (_messages(USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "multiply", "arguments": "[1, 2]"}}]}, ANSWER),
     ["line 1: messages[1].tool_calls[0].arguments must be a JSON object, got [1, 2]"]),
    (_messages(USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}, ANSWER),
     ["line 1: messages[1].tool_calls[0] needs a function 'name'"]),
    (_messages(USER, {"role": "assistant", "tool_calls": []}, ANSWER),
     ["line 1: messages[1].tool_calls must be a non-empty list of calls"]),
    (_messages(USER, {"role": "tool", "content": 12}),
     ["line 1: messages[1].content must be a string, got 12"]),
    (json.dumps({"messages": [USER, ANSWER], "tools": "[{bad"}) + "\n",
     ["a.jsonl line 1: field 'tools' is a string but not JSON ("]),
    (json.dumps({"messages": [USER, ANSWER], "tools": [{"description": "no name"}]}) + "\n",
     ["a.jsonl line 1: tools[0] needs a 'name'"]),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "multiply(1, 2)"},
                                   {"from": "observation", "value": "2"}, {"from": "gpt", "value": "2"}]}) + "\n",
     ["a.jsonl line 1: conversations[1].value is not a JSON function call ("]),
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "2"},
                                   {"from": "gpt", "value": "2"}]}) + "\n",
     ["a.jsonl line 1: conversations[1] is a tool turn without a preceding tool call"]),
])
def test_bad_tool_records_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "a.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RlhfTimeError) as error:
        validate_data_file(path, TrainingConfig())
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_bad_tool_record_exits_2_from_the_cli(tmp_path, capsys):
    from rlhf_time.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text(_messages(USER, {"role": "tool", "content": "12"}, ANSWER), encoding="utf-8")
    code = main(["train", "model_name=tiny", f"train_file={data}", f"output_dir={tmp_path / 'out'}", "report_to=none"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("bad.jsonl line 1: messages[1] is a tool turn without a preceding tool call"), err


def test_prompt_records_with_tools_render_them_as_training_does(tmp_path, tiny_tokenizer):
    """Prompt-only records for on-policy stages (examples/data/agent_prompts.jsonl): the generation prompt is the
    training layout's context before the first assistant turn."""
    from rlhf_time.data.prompts import load_prompt_dataset

    record = {"prompt": "What is 3 times 4?", "answer": "12", "tools": [OPENAI_MULTIPLY]}
    config = TrainingConfig(stage="grpo", rollout={"reward_funcs": ["exact_match"], "max_prompt_length": 1024})
    prompts = load_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", [record]), tiny_tokenizer, config)
    assert prompts[0]["input_ids"] == ids(tiny_tokenizer, "<|im_start|>system\n" + HERMES_SYSTEM + "<|im_end|>\n"
                                          "<|im_start|>user\nWhat is 3 times 4?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[0]["answer"] == "12" and prompts[0]["tools"] == [OPENAI_MULTIPLY]
