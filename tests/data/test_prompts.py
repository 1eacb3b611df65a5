"""Prompt-only data: formats, extra fields kept as reward columns, the layout training uses, left truncation."""

import json

import pytest

from rlhf_time import RlhfTimeError, TrainingConfig
from rlhf_time.data import ConversationEncoder, PreferencePair, tokenize_preference_pair
from rlhf_time.data.prompts import load_prompt_dataset, validate_prompt_file
from tests.conftest import write_jsonl

RECORDS = [
    {"prompt": "把数字写成中文：12", "answer": "一二"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}], "answer": "4",
     "difficulty": 3},
    {"prompt": [{"role": "user", "content": "list prompt"}], "reward_regex": "^a"},
]


def context_of_training_example(tokenizer, config, messages):
    """The tokens before the trained reply when training tokenises `messages` + a final assistant reply (the
    preference stages' layout: only the final reply is a target, as in on-policy RL)."""
    encoder = ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                                  response_template=config.response_template)
    example = tokenize_preference_pair(PreferencePair(messages, "ANSWER", "OTHER"), encoder)
    first = next(i for i, label in enumerate(example["chosen_labels"]) if label != -100)
    return example["chosen_input_ids"][:first]


@pytest.mark.parametrize("templates", [False, True])
def test_prompts_are_laid_out_as_training_lays_out_the_context(tmp_path, tiny_tokenizer, templates):
    settings = dict(prompt_template="Q: {prompt}\n", response_template="A: {response}") if templates else {}
    config = TrainingConfig(**settings)
    dataset = load_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", RECORDS), tiny_tokenizer, config)
    assert len(dataset) == 3 and dataset.prompts == ["把数字写成中文：12", "2+2?", "list prompt"]
    for index, record in enumerate(RECORDS):
        messages = record.get("messages") or (record["prompt"] if isinstance(record["prompt"], list)
                                              else [{"role": "user", "content": record["prompt"]}])
        assert dataset.prompt_messages[index] == messages
        assert dataset.input_ids[index] == context_of_training_example(tiny_tokenizer, config, messages)
    if not templates:  # and as the tokenizer's own chat template renders the generation prompt
        text = tiny_tokenizer.apply_chat_template(RECORDS[1]["messages"], tokenize=False, add_generation_prompt=True)
        assert dataset.input_ids[1] == tiny_tokenizer(text, add_special_tokens=False).input_ids
    # Extra fields are kept (None where a record lacks one) and repeated per completion for the reward functions.
    assert dataset.columns == {"answer": ["一二", "4", None], "difficulty": [None, 3, None],
                               "reward_regex": [None, None, "^a"]}
    columns = dataset.reward_columns([1, 0], repeat=2)
    assert columns["answer"] == ["4", "4", "一二", "一二"]
    assert columns["prompt_messages"][2] == [{"role": "user", "content": "把数字写成中文：12"}]
    assert dataset[1]["difficulty"] == 3 and dataset[1]["prompt"] == "2+2?"


def test_json_and_csv_and_left_truncation(tmp_path, tiny_tokenizer):
    (tmp_path / "p.json").write_text(json.dumps({"data": [{"prompt": "一二三四五六七八九十" * 3, "answer": "x"},
                                                           {"prompt": "hi", "answer": "y"}]}), encoding="utf-8")
    (tmp_path / "p.csv").write_text("prompt,answer\n" + "一二三四五六七八九十" * 3 + ",x\nhi,y\n", encoding="utf-8")
    full = load_prompt_dataset(tmp_path / "p.json", tiny_tokenizer, TrainingConfig())
    for name in ("p.json", "p.csv"):
        cut = load_prompt_dataset(tmp_path / name, tiny_tokenizer,
                                  TrainingConfig(stage="grpo", rollout={"max_prompt_length": 12}))
        assert cut.input_ids[0] == full.input_ids[0][-12:]  # the end of the prompt is kept
        assert cut.input_ids[1] == full.input_ids[1] and len(full.input_ids[1]) <= 12
        assert cut.columns["answer"] == ["x", "y"]
        assert cut.stats.truncated == 1 and cut.lengths == [12, len(full.input_ids[1])]
        assert cut.stats.summary() == (f"2 prompts from 2 records, {12 + len(full.input_ids[1])} prompt tokens, "
                                       f"1 truncated from the left to max_prompt_length")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "line 1: the prompt ends with an assistant turn"),
    ({"question": "q"}, r"line 1: a prompt record needs 'prompt' \(text or messages\) or 'messages' \(record has: question\)"),
    ({"prompt": ""}, "line 1: field 'prompt' is empty"),
    ({"messages": [{"role": "system", "content": "s"}]}, "line 1: the prompt has no user message"),
])
def test_bad_prompt_records_name_the_line_and_the_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(RlhfTimeError, match=message):
        validate_prompt_file(path)
