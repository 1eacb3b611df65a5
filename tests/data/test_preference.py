"""Preference pairs: (prompt + chosen) and (prompt + rejected) with SFT's masking, margins, dropped pairs."""

import math

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.data import ConversationEncoder, PreferencePair, load_preference_dataset, tokenize_preference_pair
from rlhf_time.errors import RlhfTimeError
from tests.conftest import write_jsonl
from tests.data.test_tokenize import expected, load


def test_tokenize_preference_pair_with_templates_trains_reply_and_eos(tiny_tokenizer):
    encoder = ConversationEncoder(tiny_tokenizer, prompt_template="请回答以下问题：{prompt}", response_template="回答：{response}")
    pair = PreferencePair([{"role": "user", "content": "1+1"}], chosen="2", rejected="3", margin=0.5)
    example = tokenize_preference_pair(pair, encoder)
    eos = tiny_tokenizer.eos_token
    for side, reply in (("chosen", "2"), ("rejected", "3")):
        reference = expected(tiny_tokenizer, [("请回答以下问题：1+1回答：", False), (reply + eos, True)])
        assert (example[f"{side}_input_ids"], example[f"{side}_labels"]) == (reference["input_ids"], reference["labels"])


def test_preference_pairs_share_the_prompt_and_identical_pairs_are_dropped(tmp_path, tiny_tokenizer):
    records = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
               {"prompt": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hello"},
                "rejected": [{"role": "assistant", "content": "go away"}]},
               {"prompt": "same", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    dataset = load_preference_dataset(path, tiny_tokenizer, TrainingConfig(stage="dpo"))
    assert len(dataset) == 2 and dataset.stats.records == 3
    assert dataset.stats.dropped == 1 and dataset.stats.identical_pairs_dropped == 1
    assert "chosen == rejected" in dataset.stats.summary()
    first = dataset[0]
    sft = load(tmp_path, tiny_tokenizer, [{"prompt": "2+2?", "response": "4"}, {"prompt": "2+2?", "response": "5"}])
    assert (first["chosen_input_ids"], first["chosen_labels"]) == (sft[0]["input_ids"], sft[0]["labels"])
    assert (first["rejected_input_ids"], first["rejected_labels"]) == (sft[1]["input_ids"], sft[1]["labels"])
    assert first["margin"] == 1.5 and math.isnan(dataset[1]["margin"])
    assert dataset.lengths == [max(len(first["chosen_input_ids"]), len(first["rejected_input_ids"])),
                               max(len(dataset[1]["chosen_input_ids"]), len(dataset[1]["rejected_input_ids"]))]


def test_preference_multi_turn_prompt_trains_only_the_final_reply(tmp_path, tiny_tokenizer):
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "good", "rejected": "bad"}])
    pair = load_preference_dataset(path, tiny_tokenizer, TrainingConfig(stage="rm"))[0]
    context = ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
               "<|im_start|>assistant\n")
    for side, reply in (("chosen", "good"), ("rejected", "bad")):
        reference = expected(tiny_tokenizer, [(context, False), (reply + "<|im_end|>", True), ("\n", False)])
        assert (pair[f"{side}_input_ids"], pair[f"{side}_labels"]) == (reference["input_ids"], reference["labels"])


def test_each_side_is_truncated_on_its_own(tmp_path, tiny_tokenizer):
    records = [{"prompt": "p", "chosen": "短", "rejected": "长" * 100}]
    full = load_preference_dataset(write_jsonl(tmp_path / "f.jsonl", records), tiny_tokenizer, TrainingConfig(stage="dpo"))[0]
    cut = load_preference_dataset(write_jsonl(tmp_path / "c.jsonl", records), tiny_tokenizer,
                                  TrainingConfig(stage="dpo", max_seq_length=24))
    assert cut.stats.truncated == 1 and cut.lengths == [24]
    assert cut[0]["chosen_input_ids"] == full["chosen_input_ids"] and len(full["chosen_input_ids"]) < 24
    assert cut[0]["rejected_input_ids"] == full["rejected_input_ids"][:24]
    assert cut[0]["rejected_labels"] == full["rejected_labels"][:24]


def test_preference_all_identical_is_an_empty_data_set(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(RlhfTimeError, match=r"pairs.jsonl: empty data set .*1 with chosen == rejected"):
        load_preference_dataset(path, tiny_tokenizer, TrainingConfig(stage="dpo"))
