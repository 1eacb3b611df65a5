"""Data sets ready for the trainer: read, convert, tokenise, truncate, count, and cache the result."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from rlhf_time.data.formats import detect_format, prompt_of, to_messages, to_preference
from rlhf_time.data.mixing import mixture_indices
from rlhf_time.data.prompts import load_prompt_dataset
from rlhf_time.data.readers import Record, field_list
from rlhf_time.data.sources import DataSpec, as_spec, fingerprint, read_source, record_chunks, source_label
from rlhf_time.data.text import encode_documents, text_of
from rlhf_time.data.token_store import (GatheredRows, TokenCacheWriter, TokenRows, map_npz, row_lengths,
                                        targets_per_row)
from rlhf_time.data.tokenize import (ConversationEncoder, has_target, tokenize_preference_pairs,
                                     truncate)
from rlhf_time.errors import RlhfTimeError
from rlhf_time.storage import format_bytes, free_bytes

CACHE_VERSION = "4"  # bump when the tokenised result of the same inputs changes
RECORDS_PER_CHUNK = 1000  # unit of work of a tokenising process and of the progress bar
AUTO_PARALLEL_RECORDS = 20_000  # num_proc=None tokenises in parallel from this many records on


@dataclass
class DataStats:
    """How a data file became examples. records = examples + dropped."""

    records: int = 0
    examples: int = 0
    truncated: int = 0  # examples cut to max_seq_length (kept or not)
    dropped: int = 0  # records that gave no example: no target token left, or chosen == rejected
    identical_pairs_dropped: int = 0  # of those, preference pairs whose chosen equals rejected
    target_tokens: int = 0  # tokens with a label (the loss is computed on them)
    total_tokens: int = 0

    def summary(self) -> str:
        text = (f"{self.examples} examples from {self.records} records, {self.total_tokens} tokens "
                f"({self.target_tokens} trained), {self.truncated} truncated, {self.dropped} dropped")
        if self.dropped:
            reasons = []
            if self.dropped > self.identical_pairs_dropped:
                reasons.append(f"{self.dropped - self.identical_pairs_dropped} with no target left")
            if self.identical_pairs_dropped:
                reasons.append(f"{self.identical_pairs_dropped} with chosen == rejected")
            text += f" ({', '.join(reasons)})"
        return text


class TokenizedDataset:
    """SFT examples {"input_ids", "labels"} (lists of ints), their lengths, and the statistics of how they were made.

    A column is a list of rows, or rows memory-mapped from the cache (token_store.py): read as lists either way.
    """

    length_of: tuple[str, ...] = ("input_ids",)

    def __init__(self, columns: dict[str, list], stats: DataStats) -> None:
        self.columns = columns
        self.stats = stats
        self.lengths = np.maximum.reduce([row_lengths(columns[key]) for key in self.length_of]).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return {key: values[index] for key, values in self.columns.items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class PreferenceDataset(TokenizedDataset):
    """Pairs {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "margin" (nan: none)};
    `lengths` holds the longer of the two sequences of each pair."""

    length_of = ("chosen_input_ids", "rejected_input_ids")


# ----------------------------------------------------------------------------------------- entry points
def validate_records(path, config, kind: str = "conversation", *, cache_dir: Optional[str | Path] = None) -> None:
    """Read and check every record of a data set read whole (no tokenizer needed) so bad data fails before a model
    is loaded. rlhf_time.data.validation.validate_data_file is the entry point for every kind of data.

    path: a file / source, a list of them, or a DataSpec.
    kind: "conversation" or "preference" (checked by the caller, rlhf_time.data.validation).
    With cache_dir, a data set that passed once with the same content and data settings is not read again: a
    marker named after (content fingerprint, settings) is kept in cache_dir/validated.
    """
    spec = as_spec(path)
    marker = _validation_marker(spec, config, kind, Path(cache_dir)) if cache_dir is not None else None
    if marker is not None and marker.is_file():
        return
    for source in spec.sources:
        _, chunks = record_chunks(source, config, spec.role)
        first = next(chunks)
        fmt = detect_format(first[0], config.data_format)
        check_format_fits_kind(first[0], fmt, kind, config)
        wants_pairs = kind == "preference"
        for record in (r for chunk in itertools.chain([first], chunks) for r in chunk):
            if fmt == "text":
                text_of(record)
            else:
                to_preference(record) if wants_pairs else to_messages(record, fmt)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def check_format_fits_kind(first: Record, fmt: str, kind: str, config) -> None:
    """A source's format (of its first record) must be what the stage trains on: pairs or conversations."""
    wants_pairs = kind == "preference"
    if fmt != "text" and wants_pairs != (fmt == "preference"):
        need = "preference pairs {prompt, chosen, rejected}" if wants_pairs else "prompt/response or conversations"
        if config.data_format != "auto":  # the user named the format: the format, not the file, is the mistake
            fix = ("set data_format: auto (or prompt_response, messages, alpaca, sharegpt) for this stage, or train "
                   "pairs with stage rm or dpo") if fmt == "preference" else "set data_format: preference (or auto)"
            raise RlhfTimeError(f"data_format {fmt} does not suit stage {config.stage!r}, which trains on {need}: {fix}")
        raise RlhfTimeError(f"{first.location}: stage {config.stage!r} needs {need}; this file has "
                            f"fields {field_list(first.data)}")


def _validation_marker(spec: DataSpec, config, kind: str, cache_dir: Path) -> Path:
    settings = dict(version=CACHE_VERSION, data_format=config.data_format, columns=config.columns,
                    kind=kind, role=spec.role, train_split=config.train_split,
                    eval_split=config.eval_split, subset=config.dataset_subset,
                    sources=[fingerprint(source, config, spec.role) for source in spec.sources])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir / "validated" / key


def read_prompts(path: str | Path) -> list[str]:
    """Prompts for `rlhf-time predict`: a .txt file (one per line, blank lines skipped) or, for any data source
    (.jsonl/.json/.csv/.parquet, a datasets folder, hf://datasets/...), each record's `prompt`, `instruction`
    (+ "\\n\\n" + input), or last user message of `messages`/`conversations`."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise RlhfTimeError(f"{path}: prompt file not found")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise RlhfTimeError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise RlhfTimeError(f"{path}: no prompts (the file is empty)")
        return prompts
    return [prompt_of(record) for record in read_source(str(path), config=_NO_SETTINGS)]


class _NoSettings:
    """Data settings for reading prompts: no column mapping, default splits."""

    columns = train_split = eval_split = eval_file = dataset_subset = None


_NO_SETTINGS = _NoSettings()


def load_sft_dataset(path, tokenizer, config, *, cache_dir=None, max_samples: Optional[int] = None) -> TokenizedDataset:
    """Tokenised SFT examples; labels are -100 except on assistant replies and the end-of-turn token closing each.

    path: a file / source, a list of them (concatenated), or a DataSpec (with mixture weights).
    Cached under cache_dir, or config.data_cache_dir when cache_dir is None (no cache when both are None).
    max_samples keeps the first N records of each source. data_format text: every token is a target.
    """
    return _load(path, tokenizer, config, cache_dir, max_samples, TokenizedDataset, _build_sft)


def load_preference_dataset(path, tokenizer, config, *, cache_dir=None,
                            max_samples: Optional[int] = None) -> PreferenceDataset:
    """Tokenised preference pairs (cached as load_sft_dataset is); only the chosen/rejected reply is a target."""
    return _load(path, tokenizer, config, cache_dir, max_samples, PreferenceDataset, _build_preference)


def load_dataset_of_kind(kind: str, path, tokenizer, config, *, cache_dir=None,
                         max_samples: Optional[int] = None) -> TokenizedDataset:
    """The tokenised data set of a stage's data kind ("conversation" or "preference")."""
    check_data_kind(kind)
    return DATA_KINDS[kind](path, tokenizer, config, cache_dir=cache_dir, max_samples=max_samples)


def check_data_kind(kind: str) -> None:
    if kind not in DATA_KINDS:
        raise RlhfTimeError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")


# ------------------------------------------------------------------------------------------ building
def _encoder(tokenizer, config) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                               response_template=config.response_template, system_prompt=config.system_prompt,
                               max_seq_length=config.max_seq_length)


def _build_sft(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    fmt = detect_format(records[0], config.data_format)
    if fmt == "text":
        return _build_text(records, tokenizer, config)
    encoder = _encoder(tokenizer, config)
    segments = [encoder.segments(to_messages(r, fmt), r.location) for r in records]
    stats = DataStats(records=len(records))
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for input_ids, labels in encoder.encode_many(segments):
        input_ids, labels, cut = truncate(input_ids, labels, config.max_seq_length)
        stats.truncated += cut
        if not has_target(labels):
            stats.dropped += 1
            continue
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
    return columns, stats


def _build_text(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    """Continued pre-training: documents cut into blocks, labels == input_ids (see text.py)."""
    stats = DataStats(records=len(records))
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for block in encode_documents([text_of(r) for r in records], tokenizer, config.max_seq_length):
        if len(block) < 2:  # a 1-token tail predicts nothing
            stats.dropped += 1
            continue
        columns["input_ids"].append(block)
        columns["labels"].append(list(block))
    return columns, stats


def _build_preference(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    encoder = _encoder(tokenizer, config)
    pairs = [to_preference(r) for r in records]
    stats = DataStats(records=len(records))
    kept = [(r, p) for r, p in zip(records, pairs) if p.chosen != p.rejected]
    stats.identical_pairs_dropped = stats.dropped = len(pairs) - len(kept)
    encoded = tokenize_preference_pairs([p for _, p in kept], encoder, [r.location for r, _ in kept])
    columns: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                "rejected_labels", "margin")}
    for (_, pair), example in zip(kept, encoded):  # each side is truncated on its own, keeping its reply's start
        chosen = truncate(example["chosen_input_ids"], example["chosen_labels"], config.max_seq_length)
        rejected = truncate(example["rejected_input_ids"], example["rejected_labels"], config.max_seq_length)
        stats.truncated += chosen[2] or rejected[2]
        if not (has_target(chosen[1]) and has_target(rejected[1])):
            stats.dropped += 1
            continue
        columns["chosen_input_ids"].append(chosen[0])
        columns["chosen_labels"].append(chosen[1])
        columns["rejected_input_ids"].append(rejected[0])
        columns["rejected_labels"].append(rejected[1])
        columns["margin"].append(pair.margin)
    return columns, stats


def _load(path, tokenizer, config, cache_dir, max_samples, dataset_class: type[TokenizedDataset],
          build: Callable) -> TokenizedDataset:
    spec = as_spec(path)
    cache_dir = cache_dir if cache_dir is not None else config.data_cache_dir
    parts = [_load_source(source, spec.role, tokenizer, config, cache_dir, max_samples, dataset_class, build)
             for source in spec.sources]
    if len(parts) == 1:
        return dataset_class(*parts[0])
    picks = (mixture_indices([len(columns[dataset_class.length_of[0]]) for columns, _ in parts], spec.weights,
                             config.seed)
             if spec.weights else [range(len(columns[dataset_class.length_of[0]])) for columns, _ in parts])
    # The picked rows of each source, not copies: memory-mapped sources stay on disk.
    columns: dict[str, Any] = {key: GatheredRows([part[key] for part, _ in parts], picks) for key in parts[0][0]}
    stats = DataStats(records=sum(s.records for _, s in parts), truncated=sum(s.truncated for _, s in parts),
                      dropped=sum(s.dropped for _, s in parts),
                      identical_pairs_dropped=sum(s.identical_pairs_dropped for _, s in parts))
    _count_tokens(columns, stats, dataset_class)
    return dataset_class(columns, stats)


def _load_source(source: str, role: str, tokenizer, config, cache_dir, max_samples,
                 dataset_class: type[TokenizedDataset], build: Callable) -> tuple[dict[str, list], DataStats]:
    """One source's tokenised columns and stats, from the cache or built (and cached)."""
    kind = dataset_class.__name__
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(source, role, tokenizer, config, max_samples, kind)
        cache_file = Path(cache_dir) / f"{source_label(source)}-{kind}-{key}.npz"
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached
    total, chunks = record_chunks(source, config, role, limit=max_samples, size=RECORDS_PER_CHUNK)
    first = next(chunks)
    # The format is the source's (its first record's), not each chunk's.
    config = config.model_copy(update={"data_format": detect_format(first[0], config.data_format)})
    records = itertools.chain([first], chunks)
    if cache_file is None:  # rows held as lists
        columns: dict[str, list] = {}
        stats = _build_in_chunks(records, total, tokenizer, config, build, source, dataset_class,
                                 lambda part: [columns.setdefault(key, []).extend(rows) for key, rows in part.items()])
        _require_examples(source, stats)
        return columns, stats
    # Each chunk's rows go straight to the cache file, which is then memory-mapped: never all as Python lists.
    try:
        writer = TokenCacheWriter(cache_file)
        try:
            stats = _build_in_chunks(records, total, tokenizer, config, build, source, dataset_class, writer.add)
            _require_examples(source, stats)
            writer.finish(json.dumps(asdict(stats)))
        finally:
            writer.abort()
    except OSError as error:  # disk full, quota, read-only: the writer removed its partial files
        raise RlhfTimeError(f"{cache_file}: cannot write the tokenised data cache ({error.strerror or error}; "
                            f"{format_bytes(free_bytes(cache_file))} free); nothing partial was left and no model "
                            f"was trained yet: free some space or set data_cache_dir to a disk with room") from None
    cached = _read_cache(cache_file)
    if cached is None:
        raise RlhfTimeError(f"{cache_file}: the tokenised data just written cannot be read back (disk full?)")
    return cached


def _require_examples(source: str, stats: DataStats) -> None:
    if stats.examples == 0:
        raise RlhfTimeError(f"{source}: empty data set after tokenisation ({stats.summary()}); "
                            f"raise max_seq_length or check the data")


def _count_tokens(columns: dict[str, list], stats: DataStats, dataset_class: type[TokenizedDataset]) -> None:
    stats.total_tokens = stats.target_tokens = 0
    for ids_key in dataset_class.length_of:
        labels_key = ids_key.replace("input_ids", "labels")
        stats.total_tokens += int(row_lengths(columns[ids_key]).sum())
        stats.target_tokens += int(targets_per_row(columns[labels_key]).sum())
    stats.examples = len(columns[dataset_class.length_of[0]])


# ------------------------------------------------------------------------------- parallel tokenisation
_worker_job: Optional[tuple[Callable, Any, Any]] = None  # (build, tokenizer, config), inherited by forked workers


def _build_chunk(records: list[Record]) -> tuple[dict[str, list], DataStats]:
    build, tokenizer, config = _worker_job
    return build(records, tokenizer, config)


def _build_in_chunks(chunks: Iterator[list[Record]], total: int, tokenizer, config, build: Callable, source: str,
                     dataset_class: type[TokenizedDataset], add: Callable[[dict[str, list]], Any]) -> DataStats:
    """build() over consecutive chunks of records, in order, in num_proc processes, with a progress bar; each
    chunk's columns are passed to add() in order, so together they equal build(all records) (every record is
    tokenised on its own). Returns the statistics of the whole."""
    global _worker_job
    from tqdm.auto import tqdm

    processes = num_processes(config, total) if total > RECORDS_PER_CHUNK else 1
    progress = tqdm(total=total, desc="tokenize", postfix=source, unit=" records", dynamic_ncols=True,
                    disable=config.disable_progress_bar or total <= RECORDS_PER_CHUNK)
    stats = DataStats(records=total)

    def take(columns: dict[str, list], part: DataStats) -> None:
        add(columns)
        counted = DataStats()
        _count_tokens(columns, counted, dataset_class)
        stats.examples += counted.examples
        stats.total_tokens += counted.total_tokens
        stats.target_tokens += counted.target_tokens
        stats.truncated += part.truncated
        stats.dropped += part.dropped
        stats.identical_pairs_dropped += part.identical_pairs_dropped

    if processes <= 1:
        for chunk in chunks:
            take(*build(chunk, tokenizer, config))
            progress.update(len(chunk))
    else:
        # fork: workers inherit the tokenizer and config instead of unpickling them; one Rust thread pool each.
        _worker_job, previous = (build, tokenizer, config), os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                # A few chunks per process at a time, so the records are not all read (and queued) at once.
                while window := list(itertools.islice(chunks, 4 * processes)):
                    for result in pool.map(_build_chunk, window):
                        take(*result)
                    progress.update(sum(map(len, window)))
        finally:
            _worker_job = None
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    progress.close()
    return stats


def num_processes(config, records: int) -> int:
    """config.num_proc, or None -> 1 for small data, else up to 8 (never more than the CPUs)."""
    if config.num_proc:
        return config.num_proc
    return 1 if records < AUTO_PARALLEL_RECORDS else max(1, min(8, os.cpu_count() or 1))


# How records become examples, and the data set class, of each tokenised data kind (streaming.py uses them too).
BUILDERS: dict[str, Callable] = {"conversation": _build_sft, "preference": _build_preference}
DATA_CLASSES: dict[str, type[TokenizedDataset]] = {"conversation": TokenizedDataset, "preference": PreferenceDataset}

# The loader of each data kind a stage can declare.
DATA_KINDS: dict[str, Callable[..., TokenizedDataset]] = {
    "conversation": load_sft_dataset,
    "preference": load_preference_dataset,
    "prompt": load_prompt_dataset,  # on-policy stages: prompts only (rlhf_time.data.prompts)
}


# ------------------------------------------------------------------------------------------------- cache
def _cache_key(source: str, role: str, tokenizer, config, max_samples, kind) -> str:
    """Hash of everything the tokenised result depends on: the source's content, tokenizer, and the data settings
    (not num_proc: the result is the same for any number of processes)."""
    digest = hashlib.sha256()
    digest.update(fingerprint(source, config, role).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    settings = dict(version=CACHE_VERSION, kind=kind, max_samples=max_samples, tokenizer=type(tokenizer).__name__,
                    chat_template=tokenizer.chat_template, special=tokenizer.special_tokens_map,
                    data_format=config.data_format, prompt_template=config.prompt_template,
                    response_template=config.response_template, system_prompt=config.system_prompt,
                    max_seq_length=config.max_seq_length, columns=config.columns)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _read_cache(cache_file: Path) -> Optional[tuple[dict[str, Any], DataStats]]:
    """The cached columns (token rows memory-mapped, token_store.py) and stats, or None when absent or unreadable
    (then it is rebuilt and rewritten)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            stats = DataStats(**json.loads(str(data["stats"])))
            names = [name.removesuffix(".flat") for name in data.files if name.endswith(".flat")]
            offsets = {name: data[f"{name}.offsets"] for name in names}
            margin = data["margin"].tolist() if "margin" in data.files else None
        flat = map_npz(cache_file, [f"{name}.flat" for name in names])
        columns: dict[str, Any] = {name: TokenRows(flat[f"{name}.flat"], offsets[name]) for name in names}
        if any(len(rows.flat) != rows.offsets[-1] for rows in columns.values()):
            return None
        if margin is not None:
            columns["margin"] = margin
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile):
        return None
    return columns, stats
