"""Streamed train data (rlhf_time.data.streaming): the tokens of the in-memory data, a seeded bounded shuffle,
records split across ranks, mixtures in proportion, and an exact resume from any point."""

import json
from collections import Counter

import datasets
import pytest

from rlhf_time import TrainingConfig
from rlhf_time.data import load_preference_dataset, load_sft_dataset, train_spec
from rlhf_time.data.quickstart import TRAIN_FILE, make_preference_records
from rlhf_time.data.streaming import StreamedBatches, dumps_states, loads_states
from rlhf_time.config import ConfigError
from rlhf_time.errors import RlhfTimeError
from tests.conftest import write_jsonl

RECORDS = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:40]]
# Records with a system prompt and a multi-turn conversation: the messages path of the encoder too.
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": r["response"][::-1]}]} for r in RECORDS[:12]]


def _config(train_file, **settings) -> TrainingConfig:
    values = dict(model_name="tiny", train_file=train_file, streaming=True, max_steps=10, batch_size=1,
                  shuffle=False, group_by_length=False, max_seq_length=64, report_to="none")
    values.update(settings)
    return TrainingConfig(**values)


def _stream(config, kind="conversation", **where) -> StreamedBatches:
    return StreamedBatches(kind, train_spec(config), _stream.tokenizer, config, **where)


def _in_order(stream: StreamedBatches, count: int) -> list[dict]:
    return [example for batch in stream.next_micro_batches(count) for example in batch]


@pytest.fixture(autouse=True)
def _tokenizer(tiny_tokenizer):
    _stream.tokenizer = tiny_tokenizer


def _write(kind: str, folder, records) -> str:
    if kind == "jsonl":
        return str(write_jsonl(folder / "train.jsonl", records))
    if kind == "json":
        (folder / "train.json").write_text(json.dumps({"data": records}), encoding="utf-8")
        return str(folder / "train.json")
    if kind == "csv":
        lines = ["prompt,response"] + [f'"{r["prompt"]}","{r["response"]}"' for r in records]
        (folder / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(folder / "train.csv")
    table = datasets.Dataset.from_list(records)
    if kind == "parquet":
        table.to_parquet(str(folder / "train.parquet"))
        return str(folder / "train.parquet")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": table}).save_to_disk(str(folder / "saved"))
        return str(folder / "saved")
    (folder / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "hub" / "data" / "train-00000-of-00001.parquet"))
    return str(folder / "hub")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "save_to_disk", "hub_folder"])
def test_streamed_tokens_equal_the_in_memory_data_set(tmp_path, tiny_tokenizer, kind):
    """Unshuffled, one example per batch: the stream is the in-memory data set, example for example, then again."""
    source = _write(kind, tmp_path, RECORDS)
    config = _config(source)
    expected = load_sft_dataset(str(TRAIN_FILE), tiny_tokenizer, config.model_copy(update={"streaming": False}),
                                max_samples=len(RECORDS))
    got = _in_order(_stream(config), 2 * len(expected))
    assert got == [expected[i] for i in range(len(expected))] * 2


@pytest.mark.parametrize("kind", ["messages", "text", "preference"])
def test_streamed_formats_equal_the_in_memory_data_set(tmp_path, tiny_tokenizer, kind):
    settings, load, data_kind = {}, load_sft_dataset, "conversation"
    if kind == "messages":
        records = MESSAGES
    elif kind == "text":
        # documents longer than max_seq_length become several blocks
        records, settings = [{"text": (r["prompt"] + " " + r["response"]) * 3} for r in RECORDS[:10]], {"data_format": "text"}
    else:
        records, load, data_kind = make_preference_records(12, seed=3), load_preference_dataset, "preference"
        settings = {"stage": "dpo"}
    source = str(write_jsonl(tmp_path / "train.jsonl", records))
    config = _config(source, max_seq_length=32, **settings)
    expected = load(source, tiny_tokenizer, config.model_copy(update={"streaming": False}))
    got = _in_order(_stream(config, data_kind), len(expected))
    assert len(expected) >= len(records) and got == [expected[i] for i in range(len(expected))]


def test_shuffle_is_seeded_bounded_and_a_permutation_per_pass(tmp_path):
    source = _write("jsonl", tmp_path, RECORDS)
    order = lambda **s: [e["input_ids"] for e in _in_order(_stream(_config(source, shuffle=True, **s)), 80)]  # noqa: E731
    plain = [e["input_ids"] for e in _in_order(_stream(_config(source)), 40)]
    first = order(shuffle_buffer_size=8)
    assert first == order(shuffle_buffer_size=8)  # seeded
    assert first != order(shuffle_buffer_size=8, seed=1) and first[:40] != plain
    # output i is taken from the first 8 + i records read: no record comes earlier than 7 places before its own
    position = {tuple(ids): i for i, ids in enumerate(plain)}
    assert all(position[tuple(ids)] <= i + 7 for i, ids in enumerate(first[:40]))
    # after 80 outputs, 87 records were read (two passes and 7 of the third): all were output but the 7 buffered
    read = Counter(map(tuple, plain * 2 + plain[:7]))
    assert not Counter(map(tuple, first)) - read and sum((read - Counter(map(tuple, first))).values()) == 7


def test_ranks_split_the_records(tmp_path):
    source = _write("jsonl", tmp_path, RECORDS)
    config = _config(source)
    ranks = [_in_order(_stream(config, rank=r, world_size=2), 20) for r in (0, 1)]
    expected = _in_order(_stream(config), 40)
    assert ranks[0] == expected[0::2] and ranks[1] == expected[1::2]  # one shard: every other record


def test_mixture_draws_in_the_stated_proportions(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": f"{i}"} for i in range(7)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "response": f"{i}"} for i in range(30)])
    config = _config([str(first), str(second)], mix_weights=[0.2, 0.8], batch_size=4)
    of_first = {tuple(e["input_ids"]) for e in load_sft_dataset(str(first), _stream.tokenizer, config.model_copy(update={"streaming": False}))}
    examples = _in_order(_stream(config), 500)
    share = sum(tuple(e["input_ids"]) in of_first for e in examples) / len(examples)
    assert abs(share - 0.2) < 3 * (0.2 * 0.8 / len(examples)) ** 0.5  # within 3 standard errors of the binomial
    # the small source starts over when it runs out: every one of its records was drawn, several times
    assert {tuple(e["input_ids"]) for e in examples} >= of_first


@pytest.mark.parametrize("settings", [
    dict(shuffle=True, shuffle_buffer_size=5, batch_size=3, group_by_length=True),
    dict(shuffle=True, shuffle_buffer_size=4, batch_size=2, max_tokens_per_batch=90, mix_weights=[1, 2]),
    dict(shuffle=True, shuffle_buffer_size=6, batch_size=2, rank=1, world_size=2),
], ids=["grouped", "token_budget_mixture", "rank_1_of_2"])
def test_resume_from_any_point_continues_exactly(tmp_path, monkeypatch, settings):
    """Stopped after k micro-batches (inside windows, at their ends, across passes) and rebuilt from the saved
    state as JSON, the stream continues with exactly the micro-batches of an uninterrupted one."""
    monkeypatch.setattr("rlhf_time.data.streaming.WINDOW_BATCHES", 4)  # small windows: many window ends
    where = {key: settings.pop(key) for key in ("rank", "world_size") if key in settings}
    second = write_jsonl(tmp_path / "b.jsonl", RECORDS[25:])
    sources = [_write("jsonl", tmp_path, RECORDS[:25])] + ([str(second)] if "mix_weights" in settings else [])
    config = _config(sources, **settings)
    full = _stream(config, **where).next_micro_batches(60)
    for stop in (1, 5, 8, 13, 29, 41):
        stream = _stream(config, **where)
        head = stream.next_micro_batches(stop)
        saved = dumps_states([stream.state_dict()] * where.get("world_size", 1))  # (each rank reads its own)
        resumed = _stream(config, **where)
        resumed.load_state_dict(loads_states(saved))
        assert head + resumed.next_micro_batches(60 - stop) == full, stop


def test_resume_on_another_number_of_ranks_is_refused(tmp_path):
    config = _config(_write("jsonl", tmp_path, RECORDS))
    stream = _stream(config)
    stream.next_micro_batches(3)
    with pytest.raises(RlhfTimeError, match="saved on 1 rank"):
        _stream(config, rank=0, world_size=2).load_state_dict([stream.state_dict()])


def test_a_bad_record_met_while_streaming_names_it(tmp_path):
    records = RECORDS[:5] + [{"prompt": "p", "answer": "no response field"}] + RECORDS[5:10]
    config = _config(_write("jsonl", tmp_path, records))
    with pytest.raises(RlhfTimeError, match=r"train\.jsonl record 6: .*response"):
        _stream(config).next_micro_batches(10)


def test_streaming_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="streaming: true needs max_steps"):
        TrainingConfig(model_name="tiny", train_file="x.jsonl", streaming=True)
    with pytest.raises(ConfigError, match="grpo reads its prompts whole"):
        TrainingConfig(model_name="tiny", train_file="x.jsonl", streaming=True, max_steps=2, stage="grpo",
                       rollout={"reward_funcs": ["length"]})
    with pytest.raises(ConfigError, match="save_strategy: epoch has no meaning with streaming"):
        TrainingConfig(model_name="tiny", train_file="x.jsonl", streaming=True, max_steps=2, save_strategy="epoch")
    with pytest.raises(ConfigError, match="precompute_ref_logps needs the whole train set"):
        TrainingConfig(model_name="tiny", train_file="x.jsonl", streaming=True, max_steps=2, stage="dpo",
                       dpo={"precompute_ref_logps": True})
    config = TrainingConfig(model_name="tiny", train_file="x.jsonl", streaming=True, max_steps=2)
    assert (config.save_strategy, config.eval_strategy) == ("steps", "no")
    config = TrainingConfig(model_name="tiny", train_file="x.jsonl", eval_file="y.jsonl", streaming=True, max_steps=2)
    assert config.eval_strategy == "steps"
    assert TrainingConfig(**config.to_dict()).streaming  # a saved config reloads


def test_validation_reads_only_the_first_record_and_checks_it_suits_the_stage(tmp_path):
    from rlhf_time.data import validate_data_file

    records = RECORDS[:3] + [{"prompt": "p", "answer": "no response"}]  # bad, but only met while training
    source = _write("jsonl", tmp_path, records)
    validate_data_file(train_spec(_config(source)), _config(source))  # passes: the first record is fine
    with pytest.raises(RlhfTimeError, match="missing field 'response'"):
        validate_data_file(train_spec(_config(source)), _config(source, streaming=False))  # reads them all
    with pytest.raises(RlhfTimeError, match=r"record 1: stage 'dpo' needs preference pairs"):
        validate_data_file(train_spec(_config(source, stage="dpo")), _config(source, stage="dpo"), kind="preference")
    with pytest.raises(RlhfTimeError, match=r"missing\.jsonl: data file not found"):
        validate_data_file(train_spec(_config(str(tmp_path / "missing.jsonl"))), _config(str(tmp_path / "missing.jsonl")))
