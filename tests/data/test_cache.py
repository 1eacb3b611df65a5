"""The tokenised-data cache: reused when nothing changed, rebuilt when the file or a setting changed, safe format."""

import math

import numpy as np
import pytest

import rlhf_time.data.dataset as dataset_module
from rlhf_time import TrainingConfig
from rlhf_time.data import load_preference_dataset, load_sft_dataset
from tests.conftest import write_jsonl


@pytest.fixture
def builds(monkeypatch):
    """Counts how often tokenisation really runs (a cache hit does not run it)."""
    calls = []
    for name in ("build_sft", "build_preference"):
        original = getattr(dataset_module, name)
        monkeypatch.setattr(dataset_module, name, lambda *a, _f=original: calls.append(1) or _f(*a))
    return calls


def test_cache_hit_is_identical_and_changes_invalidate(tmp_path, tiny_tokenizer, builds):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "问", "response": "答"}])
    config, cache = TrainingConfig(), tmp_path / "cache"
    first = load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1 and len(builds) == 1
    again = load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache)
    assert len(builds) == 1  # hit
    assert list(again) == list(first) and again.lengths == first.lengths and again.stats == first.stats

    load_sft_dataset(path, tiny_tokenizer, TrainingConfig(prompt_template="Q: {prompt}"), cache_dir=cache)
    assert len(builds) == 2
    load_sft_dataset(path, tiny_tokenizer, TrainingConfig(max_seq_length=8), cache_dir=cache)
    load_sft_dataset(path, tiny_tokenizer, TrainingConfig(system_prompt="s"), cache_dir=cache)
    load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache, max_samples=1)
    assert len(builds) == 5
    write_jsonl(path, [{"prompt": "q", "response": "b"}, {"prompt": "问", "response": "答"}])
    changed = load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache)
    assert len(builds) == 6 and list(changed) != list(first)
    load_sft_dataset(path, tiny_tokenizer, config, cache_dir=cache)
    assert len(builds) == 6
    assert not [p for p in cache.iterdir() if not p.name.endswith(".npz")]  # no temp files left behind


def test_chat_template_change_invalidates(tmp_path, tiny_tokenizer, builds):
    from copy import deepcopy

    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path)
    other = deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("'\n' }}{% endfor %}", "'\n\n' }}{% endfor %}")
    assert other.chat_template != tiny_tokenizer.chat_template
    load_sft_dataset(path, other, TrainingConfig(), cache_dir=tmp_path)
    assert len(builds) == 2


def test_cache_file_is_plain_int32_arrays_without_pickle(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    dataset = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    with np.load(cache_file, allow_pickle=False) as data:
        assert data["input_ids.flat"].dtype == np.int32 and data["labels.flat"].dtype == np.int32
        assert data["input_ids.flat"].tolist() == dataset[0]["input_ids"]
        assert data["labels.offsets"].tolist() == [0, len(dataset[0]["labels"])]


def test_corrupt_cache_is_rebuilt(tmp_path, tiny_tokenizer, builds):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    first = list(load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path / "cache"))
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(b"not a zip")
    assert list(load_sft_dataset(path, tiny_tokenizer, TrainingConfig(), cache_dir=tmp_path / "cache")) == first
    assert len(builds) == 2


def test_preference_cache_round_trip(tmp_path, tiny_tokenizer, builds):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2},
                                              {"prompt": "p", "chosen": "c", "rejected": "r2"},
                                              {"prompt": "p", "chosen": "x", "rejected": "x"}])
    config = TrainingConfig(stage="dpo")
    first = load_preference_dataset(path, tiny_tokenizer, config, cache_dir=tmp_path)
    again = load_preference_dataset(path, tiny_tokenizer, config, cache_dir=tmp_path)
    assert len(builds) == 1 and type(again) is type(first) and again.stats == first.stats
    for a, b in zip(again, first):
        assert {k: v for k, v in a.items() if k != "margin"} == {k: v for k, v in b.items() if k != "margin"}
    assert again[0]["margin"] == 2.0 and math.isnan(again[1]["margin"])
    assert again.lengths == first.lengths


def test_config_data_cache_dir_is_the_default_cache(tmp_path, tiny_tokenizer, builds):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    config = TrainingConfig(data_cache_dir=str(tmp_path / "from-config"))
    first = load_sft_dataset(path, tiny_tokenizer, config)
    assert list(load_sft_dataset(path, tiny_tokenizer, config)) == list(first) and len(builds) == 1
    assert len(list((tmp_path / "from-config").glob("*.npz"))) == 1
    load_sft_dataset(path, tiny_tokenizer, TrainingConfig())  # neither given: no cache, built again
    assert len(builds) == 2
