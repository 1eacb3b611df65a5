"""Bad input fails fast with one RlhfTimeError naming the file, the line/record/row and the field."""

from copy import deepcopy

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.data import load_sft_dataset, read_prompts, validate_data_file
from rlhf_time.stages.trainers import TRAINERS
from rlhf_time.errors import RlhfTimeError
from tests.conftest import write_jsonl


@pytest.mark.parametrize("name, content, config, words", [
    ("a.txt", "x", {}, ["a.txt", "unsupported", ".jsonl"]),
    ("a", "x", {}, ["unsupported", "(none)"]),
    ("a.jsonl", '{"prompt": "p", "response": "r"}\n\n{bad json}\n', {}, ["a.jsonl line 3", "malformed JSON", "property name"]),
    ("a.json", '{"data": [\n{"prompt": "p",}\n]}', {}, ["a.json line 2", "malformed JSON"]),
    ("a.jsonl", '{"prompt": "p", "answer": "r"}\n', {}, ["a.jsonl line 1: missing field 'response' (record has: answer, prompt)"]),
    ("a.jsonl", '{"prompt": "p", "response": null}\n', {}, ["line 1", "'response' must be a string, got null"]),
    ("a.jsonl", '{"prompt": "p", "response": 3}\n', {}, ["line 1", "'response' must be a string, got 3"]),
    ("a.jsonl", '{"prompt": "p", "response": "  "}\n', {}, ["line 1", "'response' is empty"]),
    ("a.jsonl", '[1, 2]\n', {}, ["line 1", "JSON object", "list"]),
    ("a.json", '{"rows": []}', {}, ["a.json", '{"data": [...]}', "rows"]),
    ("a.json", '"text"', {}, ["a.json", "list of records"]),
    ("a.json", '[{"prompt": "p", "response": "r"}, {"prompt": 1, "response": "r"}]', {}, ["a.json record 2", "'prompt'"]),
    ("a.csv", "question,answer\nq,a\n", {}, ["a.csv row 2", "answer, question", "prompt/response"]),
    ("a.csv", "prompt,answer\nq,a\nr,b\n", {}, ["a.csv row 2", "missing field 'response'", "answer, prompt"]),
    ("a.csv", "prompt,response\nq,a\nr\n", {}, ["a.csv row 3", "'response' must be a string, got null"]),
    ("a.jsonl", "", {}, ["a.jsonl", "empty data set"]),
    ("a.jsonl", "\n \n", {}, ["a.jsonl", "empty data set"]),
    ("a.json", '{"data": []}', {}, ["a.json", "empty data set"]),
    ("a.csv", "prompt,response\n", {}, ["a.csv", "empty data set"]),
    ("a.jsonl", '{"text": "x"}\n', {}, ["line 1", "cannot tell the record format", "text"]),
    ("a.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', {}, ["line 1", "messages[0]", "'robot'", "allowed"]),
    ("a.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', {}, ["line 1", "conversations[0]", "'bot'"]),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {}, ["line 1", "no assistant turn"]),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n', {},
     ["line 1", "messages[1].content is empty"]),
    ("a.jsonl", '{"messages": [{"role": "user", "text": "x"}]}\n', {}, ["line 1", "messages[0]", "'content'"]),
    ("a.jsonl", '{"messages": []}\n', {}, ["line 1", "'messages' must be a non-empty list"]),
    ("a.jsonl", '{"instruction": "i"}\n', {}, ["line 1", "missing field 'output'"]),
    ("a.jsonl", '{"prompt": "p", "response": "r"}\n', {"data_format": "alpaca"}, ["line 1", "missing field 'instruction'"]),
    ("a.jsonl", '{"prompt": "p", "response": "r"}\n', {"stage": "dpo"}, ["line 1", "stage 'dpo' needs preference pairs"]),
    ("a.jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n', {}, ["line 1", "stage 'sft' needs prompt/response"]),
    ("a.jsonl", '{"prompt": "p", "chosen": "c"}\n', {"stage": "rm"}, ["line 1", "missing field 'rejected'"]),
    ("a.jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}\n', {"stage": "rm"},
     ["line 1", "'margin' must be a number"]),
    ("a.jsonl", '{"prompt": "p", "chosen": "c", "rejected": {"role": "user", "content": "r"}}\n', {"stage": "dpo"},
     ["line 1", "'rejected' must be a string or one assistant message"]),
    ("a.jsonl", '{"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}], '
                '"rejected": "r"}\n', {"stage": "dpo"}, ["line 1", "'chosen' must be a string or one assistant message"]),
])
def test_bad_input_messages(tmp_path, name, content, config, words):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RlhfTimeError) as error:
        config = TrainingConfig(**config)
        validate_data_file(path, config, kind=TRAINERS[config.stage].data_kind)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_error_names_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "p", "response": "r"}] * 2 + [{"prompt": "p", "answer": "r"}])
    with pytest.raises(RlhfTimeError, match=r"^data/train.jsonl line 3: missing field 'response' \(record has: answer, prompt\)$"):
        validate_data_file("data/train.jsonl", TrainingConfig())


def test_missing_file_and_not_utf8(tmp_path, tiny_tokenizer):
    with pytest.raises(RlhfTimeError, match="nope.jsonl: data file not found"):
        validate_data_file(tmp_path / "nope.jsonl", TrainingConfig())
    with pytest.raises(RlhfTimeError, match="nope.jsonl: data file not found"):  # before any cache hashing
        load_sft_dataset(tmp_path / "nope.jsonl", tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path / "cache")
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "r"}\n'.encode("latin-1"))
    with pytest.raises(RlhfTimeError, match="latin.jsonl: not UTF-8"):
        validate_data_file(tmp_path / "latin.jsonl", TrainingConfig())


def test_read_prompts_errors(tmp_path):
    with pytest.raises(RlhfTimeError, match="p.txt: prompt file not found"):
        read_prompts(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(RlhfTimeError, match="p.txt: no prompts"):
        read_prompts(tmp_path / "p.txt")
    write_jsonl(tmp_path / "p.jsonl", [{"question": "q"}])
    with pytest.raises(RlhfTimeError, match=r"p.jsonl line 1: no prompt .*question"):
        read_prompts(tmp_path / "p.jsonl")


def test_chat_template_that_rewrites_history_is_an_error_naming_the_record(tmp_path, tiny_tokenizer):
    tokenizer = deepcopy(tiny_tokenizer)
    # Renders only the last message (like templates that strip earlier reasoning): prefixes are not prefixes.
    tokenizer.chat_template = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] + '<|im_end|>' }}"
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(RlhfTimeError, match=r"t.jsonl line 1: the chat template .*set prompt_template"):
        load_sft_dataset(path, tokenizer, TrainingConfig())


def test_chat_template_exception_names_the_record(tmp_path, tiny_tokenizer):
    tokenizer = deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['content'] + '<|im_end|>' }}{% endfor %}")
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"},
                                              {"prompt": "q", "response": "a", "system": "s"}])
    with pytest.raises(RlhfTimeError, match=r"t.jsonl line 2: the chat template cannot render .*System role not supported"):
        load_sft_dataset(path, tokenizer, TrainingConfig())


def test_tokenizer_without_chat_template_needs_templates(tmp_path, tiny_tokenizer):
    bare = deepcopy(tiny_tokenizer)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(RlhfTimeError, match="no chat template: set prompt_template and response_template"):
        load_sft_dataset(path, bare, TrainingConfig())
    assert len(load_sft_dataset(path, bare, TrainingConfig(prompt_template="Q: {prompt}\n"))) == 1


def test_all_examples_dropped_is_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    with pytest.raises(RlhfTimeError, match=r"d.jsonl: empty data set after tokenisation .*2 dropped"):
        load_sft_dataset(path, tiny_tokenizer, TrainingConfig(max_seq_length=1))
