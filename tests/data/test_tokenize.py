"""Record formats -> input_ids/labels, checked against the tokenizer directly (pieces tokenised by hand here)."""

import csv
import json

import pytest
from transformers import AutoTokenizer

from rlhf_time import TrainingConfig
from rlhf_time.data import load_preference_dataset, load_sft_dataset
from tests.conftest import write_jsonl

IGNORE = -100


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def load(tmp_path, tokenizer, records, name="d.jsonl", **config):
    path = write_jsonl(tmp_path / name, records)
    return load_sft_dataset(path, tokenizer, TrainingConfig(**config))


def test_chatml_prompt_response_masks_everything_but_the_reply_and_im_end(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [{"prompt": "你好", "response": "我是助手"}])[0]
    context = ids(tiny_tokenizer, "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    target = ids(tiny_tokenizer, "我是助手<|im_end|>")
    trailer = ids(tiny_tokenizer, "\n")
    assert example["input_ids"] == context + target + trailer
    assert example["labels"] == [IGNORE] * len(context) + target + [IGNORE] * len(trailer)
    assert target[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_messages_train_every_assistant_turn(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "你是一个AI助手。"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"}]
    example = load(tmp_path, tiny_tokenizer, [{"messages": messages}])[0]
    pieces = [("<|im_start|>system\n你是一个AI助手。<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False),
              ("b<|im_end|>", True), ("\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", False),
              ("d<|im_end|>", True), ("\n", False)]
    expected_ids, expected_labels = [], []
    for text, target in pieces:
        tokens = ids(tiny_tokenizer, text)
        expected_ids += tokens
        expected_labels += tokens if target else [IGNORE] * len(tokens)
    assert example["input_ids"] == expected_ids and example["labels"] == expected_labels


def test_llama3_template_trains_eot(tmp_path, llama_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    example = load(tmp_path, tokenizer, [{"prompt": "hi", "response": "yo"}])[0]
    context = ids(tokenizer, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    target = ids(tokenizer, "yo<|eot_id|>")
    assert example["input_ids"] == context + target
    assert example["labels"] == [IGNORE] * len(context) + target


def test_custom_templates_train_response_and_eos(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [{"prompt": "1+1", "response": "2"}],
                   prompt_template="请回答以下问题：{prompt}", response_template="回答：{response}")[0]
    context = ids(tiny_tokenizer, "请回答以下问题：1+1") + ids(tiny_tokenizer, "回答：")
    target = ids(tiny_tokenizer, "2" + tiny_tokenizer.eos_token)
    assert example["input_ids"] == context + target
    assert example["labels"] == [IGNORE] * len(context) + target


@pytest.mark.parametrize("record", [
    {"instruction": "翻译", "input": "cat", "output": "猫"},
    {"conversations": [{"from": "human", "value": "翻译\n\ncat"}, {"from": "gpt", "value": "猫"}]},
    {"messages": [{"role": "user", "content": "翻译\n\ncat"}, {"role": "assistant", "content": "猫"}]},
])
def test_alpaca_sharegpt_messages_match_prompt_response(tmp_path, tiny_tokenizer, record):
    reference = load(tmp_path, tiny_tokenizer, [{"prompt": "翻译\n\ncat", "response": "猫"}], name="ref.jsonl")[0]
    assert load(tmp_path, tiny_tokenizer, [record])[0] == reference


def test_three_file_formats_give_identical_examples(tmp_path, tiny_tokenizer):
    records = [{"prompt": "用户问题", "response": "模型回答"}, {"prompt": "a, \"quoted\"", "response": "b\nc"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps({"data": records}, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "l.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(records)
    config = TrainingConfig()
    loaded = [list(load_sft_dataset(tmp_path / n, tiny_tokenizer, config)) for n in ("d.json", "l.json", "d.csv")]
    reference = list(load_sft_dataset(jsonl, tiny_tokenizer, config))
    assert all(other == reference for other in loaded)


def test_truncation_keeps_response_start_and_counts(tmp_path, tiny_tokenizer):
    long_prompt = "字" * 100
    records = [{"prompt": "短", "response": "回" * 100}, {"prompt": long_prompt, "response": "答案"},
               {"prompt": "ok", "response": "fine"}]
    dataset = load(tmp_path, tiny_tokenizer, records, max_seq_length=32)
    assert dataset.stats.truncated == 2 and dataset.stats.dropped == 0 and len(dataset) == 3
    right_cut, left_cut = dataset[0], dataset[1]
    assert len(right_cut["input_ids"]) == 32 and right_cut["labels"][-1] != IGNORE  # response start kept
    assert len(left_cut["input_ids"]) == 32
    answer = ids(tiny_tokenizer, "答案<|im_end|>")
    assert left_cut["labels"][-len(answer) - 1 :] == answer + [IGNORE]  # whole (short) answer kept
    assert left_cut["input_ids"][0] == ids(tiny_tokenizer, "字")[0]  # the prompt's start was cut


def test_examples_without_targets_are_dropped_and_an_empty_result_is_an_error(tmp_path, tiny_tokenizer):
    from rlhf_time.errors import RlhfTimeError

    with pytest.raises(RlhfTimeError, match=r"d.jsonl: empty data set after tokenisation .*2 dropped"):
        load(tmp_path, tiny_tokenizer, [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}],
             max_seq_length=1)


def test_preference_pairs_share_the_prompt_and_identical_pairs_are_dropped(tmp_path, tiny_tokenizer):
    records = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
               {"prompt": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hello"},
                "rejected": "go away"},
               {"prompt": "same", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    dataset = load_preference_dataset(path, tiny_tokenizer, TrainingConfig(stage="dpo"))
    assert len(dataset) == 2 and dataset.stats.identical_pairs_dropped == 1
    first = dataset[0]
    sft = load(tmp_path, tiny_tokenizer, [{"prompt": "2+2?", "response": "4"}, {"prompt": "2+2?", "response": "5"}])
    assert (first["chosen_input_ids"], first["chosen_labels"]) == (sft[0]["input_ids"], sft[0]["labels"])
    assert (first["rejected_input_ids"], first["rejected_labels"]) == (sft[1]["input_ids"], sft[1]["labels"])
    assert first["margin"] == 1.5 and dataset[1]["margin"] != dataset[1]["margin"]  # NaN when absent


def test_system_prompt_from_config_is_added(tmp_path, tiny_tokenizer):
    example = load(tmp_path, tiny_tokenizer, [{"prompt": "q", "response": "a"}], system_prompt="你是一个AI助手。")[0]
    assert example["input_ids"][: len(ids(tiny_tokenizer, "<|im_start|>system\n你是一个AI助手。"))] == ids(
        tiny_tokenizer, "<|im_start|>system\n你是一个AI助手。")


def test_tokenizer_without_chat_template_needs_templates(tmp_path, tiny_tokenizer):
    from copy import deepcopy

    from rlhf_time.errors import RlhfTimeError

    bare = deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(RlhfTimeError, match="prompt_template"):
        load(tmp_path, bare, [{"prompt": "q", "response": "a"}])


def test_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch):
    import rlhf_time.data.dataset as dataset_module

    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    config, cache = TrainingConfig(), tmp_path / "cache"
    first = list(load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache))
    assert len(list(cache.glob("*.npz"))) == 1
    calls = []
    original = dataset_module._build_sft
    monkeypatch.setattr(dataset_module, "_build_sft", lambda *a: calls.append(1) or original(*a))
    assert list(load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache)) == first and calls == []
    load_sft_dataset(path, tiny_tokenizer, TrainingConfig(prompt_template="Q: {prompt}"), cache_dir=cache)
    write_jsonl(path, [{"prompt": "q", "response": "b"}])
    changed = list(load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache))
    assert len(calls) == 2 and changed != first
