"""Data sources: parquet, save_to_disk folders, Hub-style folders and column mapping give the tokens of the
equivalent JSONL; splits; clear errors for bad columns and splits; validation is not repeated for unchanged data."""

import datasets
import pytest

import rlhf_time.data.builders as builders_module
import rlhf_time.data.dataset as dataset_module
from rlhf_time import TrainingConfig
from rlhf_time.data import DataSpec, load_preference_dataset, load_sft_dataset, validate_data_file
from rlhf_time.errors import RlhfTimeError
from tests.conftest import write_jsonl

SFT_RECORDS = [
    {"prompt": "你好", "response": "你好！有什么可以帮你？", "system": "你是助手。"},
    {"prompt": "2+2?", "response": "4", "system": "be brief"},
    {"prompt": "Name a colour.", "response": "Blue.", "system": "s"},
]
MESSAGE_RECORDS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]},
    {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]},
]
PAIRS = [
    {"prompt": "p1", "chosen": "good one", "rejected": "bad one"},
    {"prompt": "问题", "chosen": "好的回答", "rejected": "差的回答"},
]


def _rows(dataset) -> list[dict]:
    return list(dataset)


def _sft(path, tokenizer, tmp_path, **settings):
    return load_sft_dataset(path, tokenizer, TrainingConfig(**settings), cache_dir=tmp_path / "cache")


def _hub_folder(root, splits: dict[str, list[dict]]):
    """A data set folder laid out as on the Hub: data/<split>-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    for split, records in splits.items():
        datasets.Dataset.from_list(records).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("records", [SFT_RECORDS, MESSAGE_RECORDS], ids=["prompt_response", "messages"])
def test_parquet_disk_and_hub_folders_give_the_tokens_of_the_jsonl(tmp_path, tiny_tokenizer, records):
    expected = _rows(_sft(write_jsonl(tmp_path / "d.jsonl", records), tiny_tokenizer, tmp_path))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    _hub_folder(tmp_path / "hub", {"train": records, "test": records[:1]})
    for source in ("d.parquet", "saved", "saved_dict", "hub"):
        assert _rows(_sft(str(tmp_path / source), tiny_tokenizer, tmp_path)) == expected, source


def test_preference_pairs_from_parquet_equal_jsonl(tmp_path, tiny_tokenizer):
    config = TrainingConfig(stage="dpo")
    expected = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", PAIRS), tiny_tokenizer, config)
    datasets.Dataset.from_list(PAIRS).to_parquet(str(tmp_path / "p.parquet"))
    got = load_preference_dataset(str(tmp_path / "p.parquet"), tiny_tokenizer, config)
    assert [{k: v for k, v in row.items() if k != "margin"} for row in got] == \
           [{k: v for k, v in row.items() if k != "margin"} for row in expected]


def test_splits_are_chosen_by_train_split_and_eval_split(tmp_path, tiny_tokenizer):
    hub = _hub_folder(tmp_path / "hub", {"train": SFT_RECORDS, "validation": SFT_RECORDS[:1], "test": SFT_RECORDS[1:2]})
    one = {name: _rows(_sft(write_jsonl(tmp_path / f"{name}.jsonl", rows), tiny_tokenizer, tmp_path))
           for name, rows in (("train", SFT_RECORDS), ("validation", SFT_RECORDS[:1]), ("test", SFT_RECORDS[1:2]))}
    config = TrainingConfig(train_file=str(hub), eval_split="test", data_cache_dir=str(tmp_path / "c"))
    from rlhf_time.data import eval_spec, train_spec

    assert _rows(load_sft_dataset(train_spec(config), tiny_tokenizer, config)) == one["train"]
    assert _rows(load_sft_dataset(eval_spec(config), tiny_tokenizer, config)) == one["test"]
    # eval_file without eval_split: validation is preferred over test
    config = TrainingConfig(train_file=str(hub), eval_file=str(hub))
    assert _rows(load_sft_dataset(eval_spec(config), tiny_tokenizer, config)) == one["validation"]
    with pytest.raises(RlhfTimeError, match=r"hub: no split 'dev' \(train_split\); splits: train, validation, test$"):
        _sft(DataSpec((str(hub),)), tiny_tokenizer, tmp_path, train_split="dev")
    with pytest.raises(RlhfTimeError, match="has no splits, so eval_split='test' cannot select"):
        validate_data_file(eval_spec(TrainingConfig(train_file=str(tmp_path / "train.jsonl"), eval_split="test")),
                           TrainingConfig(train_file=str(tmp_path / "train.jsonl"), eval_split="test"))


# ------------------------------------------------------------------------------------------ columns
def test_column_mapping_prompt_response(tmp_path, tiny_tokenizer):
    expected = _rows(_sft(write_jsonl(tmp_path / "d.jsonl", SFT_RECORDS), tiny_tokenizer, tmp_path))
    renamed = [{"question": r["prompt"], "answer": r["response"], "sys": r["system"]} for r in SFT_RECORDS]
    columns = {"prompt": "question", "response": "answer", "system": "sys"}
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "q.parquet"))
    for source in (write_jsonl(tmp_path / "q.jsonl", renamed), str(tmp_path / "q.parquet")):
        assert _rows(_sft(source, tiny_tokenizer, tmp_path, columns=columns)) == expected


def test_column_mapping_messages(tmp_path, tiny_tokenizer):
    expected = _rows(_sft(write_jsonl(tmp_path / "m.jsonl", MESSAGE_RECORDS), tiny_tokenizer, tmp_path))
    renamed = write_jsonl(tmp_path / "c.jsonl", [{"dialog": r["messages"]} for r in MESSAGE_RECORDS])
    assert _rows(_sft(renamed, tiny_tokenizer, tmp_path, columns={"messages": "dialog"})) == expected


def test_column_mapping_preference(tmp_path, tiny_tokenizer):
    expected = _rows(load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", PAIRS), tiny_tokenizer,
                                             TrainingConfig(stage="rm")))
    renamed = [{"question": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in PAIRS]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "r.parquet"))
    config = TrainingConfig(stage="rm", columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    validate_data_file(str(tmp_path / "r.parquet"), config, kind="preference")
    got = _rows(load_preference_dataset(str(tmp_path / "r.parquet"), tiny_tokenizer, config))
    assert [{k: v for k, v in row.items() if k != "margin"} for row in got] == \
           [{k: v for k, v in row.items() if k != "margin"} for row in expected]


def test_one_mapping_serves_sources_that_already_use_the_field_names(tmp_path, tiny_tokenizer):
    native = write_jsonl(tmp_path / "native.jsonl", SFT_RECORDS[:1])
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "2+2?", "response": "4", "system": "be brief"}])
    got = _rows(_sft([native, renamed], tiny_tokenizer, tmp_path, columns={"prompt": "question"}))
    assert got == _rows(_sft(write_jsonl(tmp_path / "both.jsonl", SFT_RECORDS[:2]), tiny_tokenizer, tmp_path))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_missing_mapped_column_names_it_and_the_columns_present(tmp_path, kind):
    rows = [{"q": "x", "a": "y"}]
    path = tmp_path / f"d.{kind}"
    write_jsonl(path, rows) if kind == "jsonl" else datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(RlhfTimeError) as error:
        validate_data_file(path, TrainingConfig(columns={"prompt": "question", "response": "a"}))
    where = f"{path} line 1" if kind == "jsonl" else str(path)
    assert str(error.value) == f"{where}: no column 'question' (columns maps prompt -> 'question'); columns present: a, q"


def test_bad_sources_give_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty").mkdir()
    for source, words in ((tmp_path / "bad.parquet", ["bad.parquet", "cannot load it with datasets"]),
                          (tmp_path / "missing.parquet", ["missing.parquet", "not found"]),
                          (tmp_path / "empty", ["empty", "cannot load it with datasets"])):
        with pytest.raises(RlhfTimeError) as error:
            validate_data_file(source, TrainingConfig())
        assert "\n" not in str(error.value) and all(word in str(error.value) for word in words), str(error.value)


# ------------------------------------------------------------------------------ validation, processes
def test_validation_is_skipped_for_unchanged_data_and_redone_when_it_changes(tmp_path, monkeypatch):
    reads = []
    original = dataset_module.record_chunks
    monkeypatch.setattr(dataset_module, "record_chunks", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    path = write_jsonl(tmp_path / "d.jsonl", SFT_RECORDS)
    config, cache = TrainingConfig(), tmp_path / "cache"
    validate_data_file(path, config, cache_dir=cache)
    validate_data_file(path, config, cache_dir=cache)
    assert len(reads) == 1
    validate_data_file(path, TrainingConfig(data_format="prompt_response"), cache_dir=cache)  # other settings
    assert len(reads) == 2
    write_jsonl(path, SFT_RECORDS[:2] + [{"prompt": "p", "answer": "r"}])  # changed content is read (and fails)
    with pytest.raises(RlhfTimeError, match="line 3: missing field 'response'"):
        validate_data_file(path, config, cache_dir=cache)


def test_parallel_tokenisation_gives_the_same_examples(tmp_path, tiny_tokenizer, monkeypatch):
    records = [{"prompt": f"question {i} " * (i % 5 + 1), "response": f"answer {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    monkeypatch.setattr(builders_module, "RECORDS_PER_CHUNK", 7)  # 6 chunks
    one = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(num_proc=1))
    two = load_sft_dataset(path, tiny_tokenizer, TrainingConfig(num_proc=2, max_seq_length=2048))
    assert _rows(one) == _rows(two) and one.stats == two.stats and len(one) == 40


# ------------------------------------------------------------------------------------------- config
def test_source_settings_are_validated():
    from rlhf_time.config import ConfigError, parse_overrides

    assert parse_overrides(["train_file=[a.jsonl, b.parquet]"]) == {"train_file": ["a.jsonl", "b.parquet"]}
    assert parse_overrides(["system_prompt=[x]"]) == {"system_prompt": "[x]"}  # str-only fields stay strings
    for settings, words in (
        (dict(train_file=["a", "b"], mix_weights=[1.0]), "mix_weights has 1 weights for 2 train_file source(s)"),
        (dict(train_file=["a", "b"], mix_weights=[0, 0]), "mix_weights must be >= 0 with a positive sum"),
        (dict(columns={"question": "q"}), "columns: unknown field(s) ['question']"),
        (dict(stage="dpo", data_format="text"), "use stage sft, not 'dpo'"),
    ):
        with pytest.raises(ConfigError) as error:
            TrainingConfig(**settings)
        assert words in str(error.value)


def test_the_format_is_the_sources_not_each_chunks(tmp_path, tiny_tokenizer, monkeypatch):
    """Records are tokenised in chunks; a later chunk whose first record also has other keys keeps the format
    detected from the source's first record."""
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    records[7]["messages"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "turn"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    whole = _rows(load_sft_dataset(path, tiny_tokenizer, TrainingConfig()))
    monkeypatch.setattr(builders_module, "RECORDS_PER_CHUNK", 7)  # record 8 opens the second chunk
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    for source in (path, str(tmp_path / "d.parquet")):
        for num_proc in (1, 2):
            assert _rows(load_sft_dataset(source, tiny_tokenizer, TrainingConfig(num_proc=num_proc))) == whole


def test_null_fields_of_arrow_rows_are_absent_fields(tmp_path, tiny_tokenizer):
    """A column some records lack is null in those rows: they mean what the records without the field mean."""
    records = [{"prompt": "q1", "response": "a1", "system": "s"}, {"prompt": "q2", "response": "a2"},
               {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}]
    expected = [_rows(_sft(write_jsonl(tmp_path / f"{i}.jsonl", [r]), tiny_tokenizer, tmp_path))[0]
                for i, r in enumerate(records)]
    columns = {key: [r.get(key) for r in records] for key in ("prompt", "response", "system", "messages")}
    table = datasets.Dataset.from_dict(columns)
    for i in range(3):  # one row per file: a file has one record format
        table.select([i]).to_parquet(str(tmp_path / f"{i}.parquet"))
        assert _rows(_sft(str(tmp_path / f"{i}.parquet"), tiny_tokenizer, tmp_path)) == [expected[i]]
