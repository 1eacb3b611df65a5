"""Batching plans (length grouping, token budget, determinism, sharding) and collators."""

import math
import random

import pytest
import torch

from rlhf_time.data import PaddingCollator, PreferenceCollator, plan_batches, shard_batches
from rlhf_time.errors import RlhfTimeError

LENGTHS = [(i * 37) % 120 + 5 for i in range(500)]


def flat(batches):
    return [i for batch in batches for i in batch]


def padding_share(batches, lengths=LENGTHS):
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for i in flat(batches)) / slots


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("budget", [None, 600])
def test_every_example_once_per_epoch_reproducible_and_new_each_epoch(group, budget):
    plan = lambda epoch: plan_batches(LENGTHS, batch_size=8, max_tokens_per_batch=budget, group_by_length=group,
                                      seed=3, epoch=epoch)
    first = plan(0)
    assert sorted(flat(first)) == list(range(len(LENGTHS)))
    assert plan(0) == first and plan(1) != first
    assert plan_batches(LENGTHS, batch_size=8, max_tokens_per_batch=budget, group_by_length=group, seed=4) != first
    if budget:
        assert all(max(LENGTHS[i] for i in b) * len(b) <= budget for b in first)
    else:
        assert sum(len(b) != 8 for b in first) == 1  # 500 = 62 * 8 + 4: one partial batch, wherever it landed


def test_token_budget_keeps_an_over_long_example_alone():
    batches = plan_batches([10, 500, 10, 10], batch_size=2, max_tokens_per_batch=100, seed=0)
    assert [1] in batches and sorted(flat(batches)) == [0, 1, 2, 3]
    assert all(len(b) == 1 or max([10, 500, 10, 10][i] for i in b) * len(b) <= 100 for b in batches)


def test_length_grouping_reduces_padding():
    grouped = plan_batches(LENGTHS, batch_size=8, group_by_length=True, seed=0)
    rng = random.Random(0)  # an independent reference: random batches
    order = list(range(len(LENGTHS)))
    rng.shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding_share(grouped) < 0.1 < padding_share(random_batches)
    # batches are still in a random order, not sorted from longest to shortest
    longest = [max(LENGTHS[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_without_grouping_batch_size_does_not_change_the_order():
    eights = plan_batches(LENGTHS, batch_size=8, group_by_length=False, seed=5)
    fours = plan_batches(LENGTHS, batch_size=4, group_by_length=False, seed=5)
    assert flat(eights) == flat(fours)
    assert all(eights[k] == fours[2 * k] + fours[2 * k + 1] for k in range(len(eights) - 1))
    assert eights[-1] == fours[-1]  # 500 = 62 * 8 + 4


def test_no_shuffle_is_file_order():
    assert plan_batches(LENGTHS[:10], batch_size=4, group_by_length=False, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    grouped = plan_batches([1, 5, 3, 4], batch_size=2, group_by_length=True, shuffle=False)
    assert grouped == [[1, 3], [2, 0]]  # one mega-chunk sorted longest first, batch order kept


def test_drop_last_drops_only_the_partial_batch():
    for group in (True, False):
        batches = plan_batches(LENGTHS, batch_size=8, group_by_length=group, seed=1, drop_last=True)
        assert len(batches) == 62 and all(len(b) == 8 for b in batches)
        assert len(set(flat(batches))) == 496


def test_empty_and_invalid():
    assert plan_batches([], batch_size=4) == []
    with pytest.raises(ValueError):
        plan_batches(LENGTHS, batch_size=0)


def test_shard_batches_are_disjoint_and_equal_length():
    batches = plan_batches(LENGTHS, batch_size=8, seed=0)  # 63 batches
    shards = [shard_batches(batches, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [31, 31]
    assert shards[0] == batches[0:62:2] and shards[1] == batches[1:62:2]
    seen = [i for shard in shards for i in flat(shard)]
    assert len(seen) == len(set(seen))
    assert shard_batches(batches, 0, 1) == batches
    with pytest.raises(ValueError):
        shard_batches(batches, 2, 2)


def test_padding_collator():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                            {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_padding_collator_multiple_and_label_pad():
    batch = PaddingCollator(pad_token_id=2, label_pad=-1, pad_to_multiple_of=4)([{"input_ids": [5] * 5, "labels": [5] * 5}])
    assert batch["input_ids"].shape == (1, 8) and batch["input_ids"][0, 5:].tolist() == [2, 2, 2]
    assert batch["labels"][0, 5:].tolist() == [-1, -1, -1] and batch["attention_mask"].sum() == 5


def test_collator_needs_a_pad_token():
    with pytest.raises(RlhfTimeError, match="pad token"):
        PaddingCollator(pad_token_id=None)


def test_preference_collator_stacks_chosen_then_rejected():
    batch = PreferenceCollator(pad_token_id=0)([
        {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 4],
         "rejected_labels": [-100, 3, 4], "margin": 0.5},
        {"chosen_input_ids": [7], "chosen_labels": [7], "rejected_input_ids": [8, 9],
         "rejected_labels": [-100, 9], "margin": math.nan}])
    assert batch["input_ids"].tolist() == [[1, 2, 0], [7, 0, 0], [1, 3, 4], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [7, -100, -100], [-100, 3, 4], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert batch["margin"].shape == (2,) and batch["margin"][0] == 0.5 and batch["margin"][1].isnan()
    assert batch["margin"].dtype == torch.float32
