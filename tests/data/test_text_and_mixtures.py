"""data_format text (continued pre-training: every token a target) and weighted mixtures of sources."""

from collections import Counter

import pytest

from rlhf_time import TrainingConfig
from rlhf_time.data import DataSpec, load_sft_dataset, validate_data_file
from rlhf_time.data.mixing import mixture_counts
from rlhf_time.errors import RlhfTimeError
from tests.conftest import write_jsonl

DOCS = ["第一篇文章。It has two languages.", "A second, somewhat longer document about nothing in particular " * 3]


def test_text_every_token_is_a_target_and_long_documents_are_split(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in DOCS])
    dataset = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(data_format="text", max_seq_length=16))
    # Reference: the tokenizer's own encoding of each document, + EOS (the tiny Qwen tokenizer adds no BOS).
    documents = [tiny_tokenizer(d, add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id] for d in DOCS]
    expected = [doc[i : i + 16] for doc in documents for i in range(0, len(doc), 16)]
    expected = [block for block in expected if len(block) > 1]
    assert [row["input_ids"] for row in dataset] == expected
    assert all(row["labels"] == row["input_ids"] for row in dataset)
    assert dataset.stats.target_tokens == sum(len(block) - 1 for block in expected)
    assert dataset.stats.records == 2 and len(dataset) == len(expected) > 2


def test_text_adds_the_bos_a_llama_tokenizer_adds(tmp_path, llama_model_dir):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_model_dir)
    # Make the tokenizer add a BOS as Llama's do (the saved tiny one adds none).
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    (row,) = load_sft_dataset(path, tokenizer, TrainingConfig(data_format="text"))
    body = tokenizer("hello world", add_special_tokens=False).input_ids
    assert row["input_ids"] == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]


def test_text_packs_by_default_and_checks_the_field(tmp_path):
    assert TrainingConfig(data_format="text").packing is True
    assert TrainingConfig(data_format="text", packing=False).packing is False
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"content": "x"}])
    with pytest.raises(RlhfTimeError, match=r"t.jsonl line 2: missing field 'text' \(record has: content\)"):
        validate_data_file(path, TrainingConfig(data_format="text"))
    mapped = write_jsonl(tmp_path / "c.jsonl", [{"content": "x"}])
    validate_data_file(mapped, TrainingConfig(data_format="text", columns={"text": "content"}))


# ------------------------------------------------------------------------------------------ mixtures
@pytest.mark.parametrize("sizes, weights, counts", [
    ([30, 10], [0.25, 0.75], [10, 30]),
    ([10, 10, 10], [1, 1, 1], [10, 10, 10]),
    ([7, 5], [0.5, 0.5], [6, 6]),
    ([3, 9], [1, 0], [12, 0]),
])
def test_mixture_counts(sizes, weights, counts):
    assert mixture_counts(sizes, weights) == counts


def test_mixture_draws_in_the_stated_proportions(tmp_path, tiny_tokenizer):
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": f"big {i}", "response": "b"} for i in range(60)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"small {i}", "response": "s"} for i in range(20)])
    config = TrainingConfig(seed=3)
    marker = {name: tiny_tokenizer(name, add_special_tokens=False).input_ids[0] for name in ("big", "small")}

    def source_of(row):
        return next(name for name, token in marker.items() if token in row["input_ids"])

    mixed = load_sft_dataset(DataSpec((str(big), str(small)), weights=(0.3, 0.7)), tiny_tokenizer, config)
    counts = Counter(source_of(row) for row in mixed)
    assert len(mixed) == 80 and counts == {"big": 24, "small": 56}  # 0.3 and 0.7 of 80
    # the small source is oversampled evenly: every example 2 or 3 times; the big one subsampled without repeats
    small_rows = Counter(tuple(row["input_ids"]) for row in mixed if source_of(row) == "small")
    big_rows = Counter(tuple(row["input_ids"]) for row in mixed if source_of(row) == "big")
    assert set(small_rows.values()) == {2, 3} and len(small_rows) == 20 and set(big_rows.values()) == {1}
    again = load_sft_dataset(DataSpec((str(big), str(small)), weights=(0.3, 0.7)), tiny_tokenizer, config)
    assert list(again) == list(mixed)  # deterministic in seed
    concatenated = load_sft_dataset([big, small], tiny_tokenizer, config)
    assert Counter(source_of(row) for row in concatenated) == {"big": 60, "small": 20}
