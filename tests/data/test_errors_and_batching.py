"""Bad input names file, line/record and field; batching plans; collators."""

import pytest
import torch

from rlhf_time import TrainingConfig
from rlhf_time.data import PaddingCollator, PreferenceCollator, plan_batches, read_prompts, shard_batches, validate_data_file
from rlhf_time.errors import RlhfTimeError


@pytest.mark.parametrize("name, content, config, words", [
    ("a.txt", "x", {}, ["a.txt", "unsupported", ".jsonl"]),
    ("a.jsonl", '{"prompt": "p", "response": "r"}\n\n{bad json}\n', {}, ["a.jsonl line 3", "malformed JSON"]),
    ("a.jsonl", '{"prompt": "p", "answer": "r"}\n', {}, ["a.jsonl line 1", "missing field 'response'", "answer, prompt"]),
    ("a.jsonl", '{"prompt": "p", "response": null}\n', {}, ["line 1", "'response'", "string"]),
    ("a.jsonl", '{"prompt": "p", "response": "  "}\n', {}, ["line 1", "'response' is empty"]),
    ("a.jsonl", '[1, 2]\n', {}, ["line 1", "JSON object"]),
    ("a.json", '{"rows": []}', {}, ["a.json", "data"]),
    ("a.json", '[{"prompt": "p", "response": "r"}, {"prompt": 1, "response": "r"}]', {}, ["a.json record 1", "'prompt'"]),
    ("a.csv", "question,answer\nq,a\n", {}, ["a.csv row 2", "answer, question", "prompt/response"]),
    ("a.csv", "prompt,answer\nq,a\n", {}, ["a.csv row 2", "missing field 'response'", "answer, prompt"]),
    ("a.jsonl", "", {}, ["a.jsonl", "empty data set"]),
    ("a.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', {}, ["line 1", "messages[0]", "robot"]),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {}, ["line 1", "no assistant turn"]),
    ("a.jsonl", '{"prompt": "p", "response": "r"}\n', {"stage": "dpo"}, ["line 1", "stage 'dpo' needs preference pairs"]),
    ("a.jsonl", '{"prompt": "p", "chosen": "c"}\n', {"stage": "rm", "data_format": "preference"}, ["line 1", "'rejected'"]),
])
def test_bad_input_messages(tmp_path, name, content, config, words):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RlhfTimeError) as error:
        validate_data_file(path, TrainingConfig(**config))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_missing_file(tmp_path):
    with pytest.raises(RlhfTimeError, match="nope.jsonl: data file not found"):
        validate_data_file(tmp_path / "nope.jsonl", TrainingConfig())


def test_read_prompts_from_txt_and_records(tmp_path):
    (tmp_path / "p.txt").write_text("一\n\n二\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["一", "二"]
    (tmp_path / "p.jsonl").write_text('{"instruction": "i", "input": "x", "output": "o"}\n', encoding="utf-8")
    assert read_prompts(tmp_path / "p.jsonl") == ["i\n\nx"]


LENGTHS = [(i * 37) % 120 + 5 for i in range(500)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("budget", [None, 600])
def test_every_example_once_per_epoch_and_reproducible(group, budget):
    plan = lambda epoch: plan_batches(LENGTHS, batch_size=8, max_tokens_per_batch=budget, group_by_length=group,
                                      seed=3, epoch=epoch)
    first = plan(0)
    assert sorted(i for batch in first for i in batch) == list(range(len(LENGTHS)))
    assert plan(0) == first and plan(1) != first
    if budget:
        assert all(max(LENGTHS[i] for i in b) * len(b) <= budget or len(b) == 1 for b in first)
    else:
        assert sum(len(b) != 8 for b in first) <= 1  # one partial batch, wherever shuffling put it


def test_length_grouping_reduces_padding():
    def padding(batches):
        slots = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
        return 1 - sum(LENGTHS) / slots

    grouped = plan_batches(LENGTHS, batch_size=8, group_by_length=True, seed=0)
    plain = plan_batches(LENGTHS, batch_size=8, group_by_length=False, seed=0)
    assert padding(grouped) < 0.1 < padding(plain)


def test_without_grouping_batch_size_does_not_change_the_order():
    eights = plan_batches(LENGTHS, batch_size=8, group_by_length=False, seed=5)
    fours = plan_batches(LENGTHS, batch_size=4, group_by_length=False, seed=5)
    assert [i for b in eights for i in b] == [i for b in fours for i in b]
    assert eights[0] == fours[0] + fours[1]


def test_shard_batches_are_disjoint_and_equal_length():
    batches = plan_batches(LENGTHS, batch_size=8, seed=0)
    shards = [shard_batches(batches, rank, 3) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))
    assert shard_batches(batches, 0, 1) == batches


def test_padding_collator():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                            {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_preference_collator_stacks_chosen_then_rejected():
    batch = PreferenceCollator(pad_token_id=0)([
        {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 4],
         "rejected_labels": [-100, 3, 4], "margin": 0.5}])
    assert batch["input_ids"].tolist() == [[1, 2, 0], [1, 3, 4]]
    assert batch["margin"].tolist() == [0.5]
