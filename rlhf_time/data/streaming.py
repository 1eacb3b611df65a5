"""Training data streamed through `datasets` (streaming=True): for data larger than memory or local disk.

Per rank, records flow through four stages, each with a small state, so a run resumes exactly where it stopped:

  sources   each train_file source is a `datasets.IterableDataset` (local jsonl/json/csv/parquet, a datasets
            folder, a Hub id), split across data-parallel ranks with `split_dataset_by_node`; several sources are
            read one after the other (concatenated) or, with mix_weights, each record is drawn from source i with
            probability w_i / sum(w) (a source that runs out starts over). State: each source's `state_dict()`
            (where `datasets` resumes reading), passes made, and the mixture's random state.
  shuffle   a buffer of shuffle_buffer_size records (seeded): each record taken leaves a random slot, which the
            next record read fills. State: the buffered records and the random state.
  window    batch_size x 50 records taken from the buffer, tokenised on the fly with the same builders as the
            in-memory data (dataset.py: same tokens for the same records), and cut into micro-batches by the
            same planner (sampler.plan_batches: length grouping, token budgets). State: the window's records (it
            is re-tokenised on resume) and the index of the next micro-batch.
  steps     the loop takes gradient_accumulation_steps micro-batches per step; epochs run on (the stream never
            ends, max_steps ends the run).

The state of every rank is saved with each checkpoint (data_state.json), so a resumed run sees exactly the
micro-batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Optional

from rlhf_time.data.dataset import (BUILDERS, DATA_CLASSES, DataStats, check_format_fits_kind)
from rlhf_time.data.formats import detect_format
from rlhf_time.data.readers import Record, check_data_path, iter_jsonl_records
from rlhf_time.data.sampler import MEGA_BATCH_FACTOR, plan_batches
from rlhf_time.data.sources import HUB_PREFIX, DataSpec, apply_columns, choose_split, source_kind
from rlhf_time.downloads import download_progress
from rlhf_time.errors import RlhfTimeError

STATE_VERSION = 1
STREAMING_KINDS = ("conversation", "preference", "unpaired")  # the data kinds a stream can feed (not on-policy prompts)
WINDOW_BATCHES = MEGA_BATCH_FACTOR  # a window holds batch_size x this many records (the planner's length groups)


# --------------------------------------------------------------------------------------------- sources
class _DropDatasetsReadErrors(logging.Filter):
    """datasets logs a multi-line error before raising when a JSON block cannot be parsed; the raise becomes our
    one-line error (file and line), so its log line would only repeat it in pyarrow's words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load JSON from file")


def open_stream(source: str, config) -> tuple[Any, str]:
    """(datasets.IterableDataset of the train split, label naming source and split) for any train_file source."""
    import datasets

    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    if not any(isinstance(f, _DropDatasetsReadErrors) for f in json_log.filters):
        json_log.addFilter(_DropDatasetsReadErrors())

    kind = source_kind(source)
    try:
        with _local_load() if kind != "hub" else contextlib.nullcontext():
            loaded = _load(source, kind, config)
    except RlhfTimeError:
        raise
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, ValueError, ArrowInvalid, ...)
        message = (str(error).strip().splitlines() or [""])[0][:300]
        raise RlhfTimeError(f"{source}: cannot stream it with datasets ({type(error).__name__}: {message})") from None
    if isinstance(loaded, (datasets.IterableDatasetDict, datasets.DatasetDict)):
        split = choose_split(list(loaded), config.train_split, "train", source)
        loaded, label = loaded[split], f"{source} [{split}]"
    else:
        label = source
    # A save_to_disk folder is Arrow on disk already (memory-mapped): read it as a stream.
    return (loaded.to_iterable_dataset() if isinstance(loaded, datasets.Dataset) else loaded), label


def _load(source: str, kind: str, config):
    import datasets

    if kind == "file":
        path = check_data_path(source)
        if path.suffix.lower() == ".csv":
            return datasets.load_dataset("csv", data_files=str(path), split="train", streaming=True,
                                         features=_csv_string_features(path), keep_default_na=False)
        field = "data" if path.suffix.lower() == ".json" and _starts_with_object(path) else None  # {"data": [...]}
        return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True, field=field)
    if kind == "parquet":
        if not Path(source).is_file():
            raise RlhfTimeError(f"{source}: data file not found")
        return datasets.load_dataset("parquet", data_files=source, split="train", streaming=True)
    if kind == "disk":
        return datasets.load_from_disk(source)
    with download_progress():  # a local Hub-style folder or hf://datasets/ORG/NAME: nothing is downloaded ahead
        return datasets.load_dataset(source[len(HUB_PREFIX):] if kind == "hub" else source,
                                     name=config.dataset_subset, streaming=True)


@contextlib.contextmanager
def _local_load():
    """No download-count request to the Hub for a local source (datasets sends one per load_dataset call, and a
    stream re-opens its sources at every pass; offline each costs a network time-out)."""
    from datasets import config as datasets_config

    previous = datasets_config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = previous


def _csv_string_features(path: Path):
    """Every CSV column read as text ("42" stays "42", an empty field stays ""), as readers.py reads CSV."""
    import datasets

    with path.open(encoding="utf-8-sig", newline="") as stream:
        header = next(csv.reader(stream), None)
    if not header:
        raise RlhfTimeError(f"{path}: empty data set (no records)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _starts_with_object(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as stream:
        while (char := stream.read(1)) and char.isspace():
            pass
    return char == "{"


def _as_record(row: dict[str, Any], location: str, columns: dict[str, str], csv_header: bool = False) -> Record:
    # Arrow gives every row every column, null where a record had no such field: drop those, so a row means
    # what the same record means in JSONL (as sources.record_chunks does). CSV headers are stripped as readers.py does.
    data = {(name.strip() if csv_header else name): value for name, value in row.items() if value is not None}
    return Record(location, apply_columns(data, columns, location))


def _is_csv(source: str) -> bool:
    return source_kind(source) == "file" and Path(source).suffix.lower() == ".csv"


def first_record(source: str, config) -> Record:
    """The first record of a source (its format is detected from it, as for in-memory data)."""
    dataset, label = open_stream(source, config)
    try:
        for row in dataset:
            return _as_record(row, f"{label} record 1", config.columns or {}, _is_csv(source))
    except RlhfTimeError:
        raise
    except Exception as error:  # datasets reads a block at a time: a bad line anywhere in it fails the first read
        raise _unreadable(source, label, 1, error) from None
    raise RlhfTimeError(f"{label}: empty data set (no records)")


def _unreadable(source: str, label: str, record: int, error: Exception) -> RlhfTimeError:
    """One line for a record the stream cannot read: for a JSONL file, the file and line at fault (pyarrow's own
    message counts rows inside a block it read, which names no line of the file)."""
    path = Path(source)
    if source_kind(source) == "file" and path.suffix.lower() == ".jsonl":
        try:
            for _ in iter_jsonl_records(path):  # raises "PATH line N: malformed JSON (...)" at the first bad line
                pass
        except RlhfTimeError as exact:
            return exact
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return RlhfTimeError(f"{label}: cannot read record {record} of the stream ({type(error).__name__}: {message})")


def check_stream_sources(spec: DataSpec, config, kind: str) -> None:
    """What validation can check of a stream without reading it: every source opens, and its first record has
    a format the stage trains on. Later records are checked as they are read (the error names the record)."""
    if kind not in STREAMING_KINDS:
        raise RlhfTimeError(f"streaming reads {' or '.join(STREAMING_KINDS)} data; stage {config.stage!r} reads "
                            f"{kind} data whole: set streaming: false")
    for source in spec.sources:
        first = first_record(source, config)
        check_format_fits_kind(first, detect_format(first, config.data_format), kind, config)


class SourceStream:
    """One source's records for this rank, pass after pass (at most `limit` records of the source per pass)."""

    def __init__(self, source: str, config, rank: int, world_size: int, limit: Optional[int]) -> None:
        self.source, self.config, self.rank, self.world_size, self.limit = source, config, rank, world_size, limit
        self.columns, self.csv_header = config.columns or {}, _is_csv(source)
        self.passes = 0  # completed passes
        self.read = 0  # records read in this pass
        self._open(None)

    def _open(self, datasets_state: Optional[dict]) -> None:
        from datasets.distributed import split_dataset_by_node

        dataset, self.label = open_stream(self.source, self.config)
        if self.limit:
            dataset = dataset.take(self.limit)  # the first N records of the source, then split across ranks
        if self.world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        if datasets_state is not None:
            dataset.load_state_dict(datasets_state)
        self.dataset, self._iterator = dataset, iter(dataset)

    def next(self) -> Optional[Record]:
        """The next record, or None when this pass has ended (the call after starts the next pass)."""
        try:
            row = next(self._iterator)
        except StopIteration:
            if self.read == 0:
                where = f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
                raise RlhfTimeError(f"{self.label}: no records to stream{where}") from None
            self.passes, self.read = self.passes + 1, 0
            self._open(None)
            return None
        except RlhfTimeError:
            raise
        except Exception as error:
            raise _unreadable(self.source, self.label, self.read + 1, error) from None
        self.read += 1
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        return _as_record(row, f"{self.label} record {self.read}{where}", self.columns, self.csv_header)

    def state_dict(self) -> dict[str, Any]:
        # Before the first record of a pass `datasets` has no position yet: the pass starts from the beginning.
        return {"passes": self.passes, "read": self.read,
                "datasets": self.dataset.state_dict() if self.read else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes, self.read = state["passes"], state["read"]
        self._open(state["datasets"])


class RecordStream:
    """The records of all sources, endlessly: concatenated (one pass over all = one epoch), or drawn by weight."""

    def __init__(self, sources: list[SourceStream], weights: Optional[tuple[float, ...]], seed: str) -> None:
        self.sources, self.weights = sources, weights
        self.rng = random.Random(f"{seed}:mixture")
        self.current = 0  # concatenation: the source being read
        self.epoch = 0  # completed passes (a mixture: of the source with fewest passes)

    def next(self) -> tuple[int, Record]:
        """(index of the source, record)."""
        if self.weights:
            index = self.rng.choices(range(len(self.sources)), weights=self.weights)[0]
            source = self.sources[index]
            record = source.next() or source.next()  # at the end of a pass, the next pass's first record
            self.epoch = min(s.passes for s in self.sources)
            return index, record
        while True:
            record = self.sources[self.current].next()
            if record is not None:
                return self.current, record
            self.current += 1
            if self.current == len(self.sources):
                self.current, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "current": self.current, "rng": _rng_state(self.rng),
                "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.current = state["epoch"], state["current"]
        _set_rng_state(self.rng, state["rng"])
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)


class ShuffleBuffer:
    """A bounded, seeded shuffle: `size` records held; each one taken leaves a random slot for the next read.
    size 0 passes records through in order."""

    def __init__(self, size: int, seed: str) -> None:
        self.size, self.items = size, []
        self.rng = random.Random(f"{seed}:shuffle")

    def next(self, read: Callable[[], tuple[int, Record]]) -> tuple[int, Record]:
        if self.size == 0:
            return read()
        while len(self.items) < self.size:
            self.items.append(read())
        slot = self.rng.randrange(len(self.items))
        item, self.items[slot] = self.items[slot], self.items[-1]
        self.items.pop()
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"items": [_item_state(item) for item in self.items], "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = [_item_from_state(item) for item in state["items"]]
        _set_rng_state(self.rng, state["rng"])


# --------------------------------------------------------------------------------------------- batches
class StreamedBatches:
    """This rank's micro-batches of a streamed train set, without end; `state_dict` / `load_state_dict` resume.

    kind: "conversation" (SFT and KD examples), "preference" (RM and DPO pairs) or "unpaired" (KTO): the same builders, so the
    same tokens, as the in-memory data sets. max_samples: at most the first N records of each source.
    """

    def __init__(self, kind: str, spec: DataSpec, tokenizer, config, *, rank: int = 0, world_size: int = 1,
                 max_samples: Optional[int] = None) -> None:
        if kind not in STREAMING_KINDS:
            raise RlhfTimeError(f"streaming reads {' or '.join(STREAMING_KINDS)} data, not {kind!r}")
        self.kind, self.tokenizer, self.config = kind, tokenizer, config
        self.rank, self.world_size = rank, world_size
        self.build, self.length_of = BUILDERS[kind], DATA_CLASSES[kind].length_of
        # Each source's format is that of its first record, as for in-memory data.
        self.configs = []
        for source in spec.sources:
            fmt = detect_format(first_record(source, config), config.data_format)
            self.configs.append(config.model_copy(update={"data_format": fmt}))
        seed = f"{config.seed}:{rank}"
        self.records = RecordStream([SourceStream(s, config, rank, world_size, max_samples) for s in spec.sources],
                                    spec.weights, seed)
        self.buffer = ShuffleBuffer(config.shuffle_buffer_size if config.shuffle else 0, seed)
        self.window_size = config.batch_size * WINDOW_BATCHES  # records per window
        self.stats = StreamStats(sources=len(spec.sources), buffer=self.buffer.size, window=self.window_size)
        self.window_number, self.window_items, self.examples, self.plan, self.batch_index = -1, [], [], [], 0
        self._epoch_of_last_example = 0

    @property
    def epoch(self) -> int:
        """Completed passes over the data by the reader (ahead of training by the buffer and one window)."""
        return self.records.epoch

    def next_micro_batches(self, count: int) -> list[list[dict[str, Any]]]:
        """The next `count` micro-batches (lists of examples), across window and epoch ends."""
        batches = []
        while len(batches) < count:
            if self.batch_index >= len(self.plan):
                self._next_window()
                continue
            batches.append([self.examples[i] for i in self.plan[self.batch_index]])
            self.batch_index += 1
        return batches

    def _next_window(self) -> None:
        items = [self.buffer.next(self.records.next) for _ in range(self.window_size)]
        self._set_window(self.window_number + 1, items, batch_index=0, count=True)
        if self.examples:
            self._epoch_of_last_example = self.epoch
        elif self.epoch - self._epoch_of_last_example >= 2:  # a whole pass without one example: never ends
            raise RlhfTimeError(f"streamed train data: a whole pass gave no example after tokenisation "
                                f"({self.stats.summary()}); raise max_seq_length or check the data")

    def _set_window(self, number: int, items: list[tuple[int, Record]], batch_index: int, count: bool) -> None:
        """Tokenise a window's records (grouped by source, each in its format) and plan its micro-batches."""
        examples = []
        for index in dict.fromkeys(i for i, _ in items):
            columns, stats = self.build([r for i, r in items if i == index], self.tokenizer, self.configs[index])
            if count:
                self.stats.add(stats, columns, self.length_of)
            keys = list(columns)
            examples += [dict(zip(keys, row)) for row in zip(*(columns[key] for key in keys))]
        lengths = [max(len(example[key]) for key in self.length_of) for example in examples]
        config = self.config
        # The buffer has shuffled the records; with length grouping the planner also shuffles the order of the
        # window's batches (else they would come sorted by length), without it the buffer's order is kept.
        self.plan = plan_batches(lengths, batch_size=config.batch_size, max_tokens_per_batch=config.max_tokens_per_batch,
                                 group_by_length=config.group_by_length, shuffle=config.shuffle and config.group_by_length,
                                 seed=config.seed, epoch=number) if examples else []
        self.window_number, self.window_items, self.examples, self.batch_index = number, items, examples, batch_index

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (JSON-serialisable)."""
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "records": self.records.state_dict(), "buffer": self.buffer.state_dict(),
                "window": {"number": self.window_number, "batch_index": self.batch_index,
                           "items": [_item_state(item) for item in self.window_items]},
                "epoch_of_last_example": self._epoch_of_last_example}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every rank saved with a checkpoint (this rank takes its own)."""
        if len(states) != self.world_size:
            raise RlhfTimeError(f"the checkpoint's data stream was saved on {len(states)} rank(s); a streamed run "
                                f"resumes on the same number of ranks, not {self.world_size}")
        state = states[self.rank]
        if state.get("version") != STATE_VERSION:
            raise RlhfTimeError(f"the checkpoint's data stream state has version {state.get('version')}; this "
                                f"rlhf_time reads version {STATE_VERSION}")
        self.records.load_state_dict(state["records"])
        self.buffer.load_state_dict(state["buffer"])
        window = state["window"]
        self._set_window(window["number"], [_item_from_state(item) for item in window["items"]],
                         window["batch_index"], count=False)
        self._epoch_of_last_example = state["epoch_of_last_example"]


class StreamStats(DataStats):
    """What has been tokenised so far (a stream's totals are not known ahead)."""

    def __init__(self, *, sources: int, buffer: int, window: int) -> None:
        super().__init__()
        self.description = (f"streamed from {sources} source(s), tokenised on the fly (shuffle buffer {buffer} "
                            f"records, windows of {window} records)")

    def add(self, stats: DataStats, columns: dict[str, list], length_of: tuple[str, ...]) -> None:
        self.records += stats.records
        self.add_counts(stats)
        self.examples += len(columns[length_of[0]])
        self.total_tokens += sum(len(row) for key in length_of for row in columns[key])

    def summary(self) -> str:
        seen = (f"; so far {self.examples} examples from {self.records} records, {self.total_tokens} tokens, "
                f"{self.truncated} truncated, {self.dropped} dropped") if self.records else ""
        return self.description + seen


# ----------------------------------------------------------------------------------------- JSON state
def _item_state(item: tuple[int, Record]) -> list:
    index, record = item
    return [index, record.location, record.data]


def _item_from_state(state: list) -> tuple[int, Record]:
    return state[0], Record(state[1], state[2])


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def dumps_states(states: list[dict[str, Any]]) -> str:
    """The ranks' states as JSON. Values JSON cannot hold (dates, bytes in unused columns) are saved as text."""
    return json.dumps({"version": STATE_VERSION, "ranks": states}, ensure_ascii=False, default=str)


def loads_states(text: str) -> list[dict[str, Any]]:
    return json.loads(text)["ranks"]
