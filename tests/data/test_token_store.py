"""Tokenised data kept on disk (rlhf_time.data.token_store): the cache is memory-mapped, rows read back as the
lists the tokeniser made, counts match a written-out formula, and the chunk-by-chunk writer writes what
np.savez writes."""

import json
import random

import numpy as np

from rlhf_time import TrainingConfig
from rlhf_time.data import load_sft_dataset, train_spec
from rlhf_time.data.quickstart import TRAIN_FILE
from rlhf_time.data.token_store import GatheredRows, TokenCacheWriter, TokenRows, map_npz
from tests.conftest import write_jsonl

RECORDS = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:30]]


def test_cached_data_is_memory_mapped_and_equals_the_lists(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    in_memory = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=None)
    for attempt in ("built", "cache hit"):
        mapped = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path / "cache")
        rows = mapped.columns["input_ids"]
        assert isinstance(rows, TokenRows) and isinstance(rows.flat, np.memmap), attempt
        assert list(mapped) == list(in_memory) and mapped.lengths == in_memory.lengths
        assert mapped.stats == in_memory.stats and isinstance(mapped[3]["labels"], list)


def test_mixture_of_cached_sources_equals_the_mixture_of_lists(tmp_path, tiny_tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", RECORDS[:10])
    second = write_jsonl(tmp_path / "b.jsonl", RECORDS[10:])
    config = TrainingConfig(train_file=[str(first), str(second)], mix_weights=[0.7, 0.3])
    lists = load_sft_dataset(train_spec(config), tiny_tokenizer, config, cache_dir=None)
    mapped = load_sft_dataset(train_spec(config), tiny_tokenizer, config, cache_dir=tmp_path / "cache")
    assert isinstance(mapped.columns["labels"], GatheredRows)
    assert list(mapped) == list(lists) and mapped.stats == lists.stats and mapped.lengths == lists.lengths


def test_target_counts_match_the_formula(tmp_path):
    """Per row: labels != -100 at positions 1.. (the first position predicts nothing), over blocks of any size."""
    rng = random.Random(0)
    rows = [[rng.choice([-100, -100, 3, 9]) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    expected = [sum(label != -100 for label in row[1:]) for row in rows]
    flat = np.array([t for row in rows for t in row], dtype=np.int32)
    stored = TokenRows(flat, np.cumsum([0, *map(len, rows)]))
    for block in (1, 7, 1 << 24):
        assert stored.targets_per_row(block_tokens=block).tolist() == expected
    assert list(stored) == rows and stored.row_lengths().tolist() == [len(row) for row in rows]


def test_writer_writes_what_np_savez_writes(tmp_path):
    rows = [[1, 2, 3], [4], [5, 6]]
    writer = TokenCacheWriter(tmp_path / "cache.npz")
    writer.add({"input_ids": rows[:2], "margin": [1.5, float("nan")]})
    writer.add({"input_ids": rows[2:], "margin": [2.0]})
    writer.finish('{"records": 3}')
    np.savez(tmp_path / "reference.npz", stats=np.array('{"records": 3}'),
             **{"input_ids.flat": np.array([1, 2, 3, 4, 5, 6], dtype=np.int32),
                "input_ids.offsets": np.array([0, 3, 4, 6], dtype=np.int64)},
             margin=np.array([1.5, float("nan"), 2.0]))
    with np.load(tmp_path / "cache.npz") as got, np.load(tmp_path / "reference.npz") as expected:
        assert got.files == expected.files
        for name in expected.files:
            assert got[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(got[name], expected[name])
    assert map_npz(tmp_path / "cache.npz", ["input_ids.flat"])["input_ids.flat"].tolist() == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz", "reference.npz"]  # no temp folder left
