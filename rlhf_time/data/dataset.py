"""Data sets ready for the trainer: each source read and tokenised (builders.py), the sources mixed, and the result
cached; and the checks and prompt reading that need no tokenizer."""

from __future__ import annotations

import hashlib
import itertools
import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rlhf_time.data.builders import (DataStats, build_in_chunks, build_preference, build_sft, build_unpaired,
                                     count_tokens, source_chunks)
from rlhf_time.data.formats import detect_format, prompt_of, to_messages, to_preference, to_unpaired
from rlhf_time.data.mixing import mixture_indices
from rlhf_time.data.prompts import load_prompt_dataset
from rlhf_time.data.readers import Record, field_list
from rlhf_time.data.sources import DataSpec, as_spec, fingerprint, read_source, record_chunks, source_label
from rlhf_time.data.text import text_of
from rlhf_time.data.token_store import (SCALAR_COLUMNS, GatheredRows, TokenCacheWriter, TokenRows, map_npz,
                                        row_lengths)
from rlhf_time.errors import RlhfTimeError
from rlhf_time.logs import get_logger
from rlhf_time.storage import format_bytes, free_bytes

CACHE_VERSION = "5"  # bump when the tokenised result of the same inputs changes


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


class UnpairedDataset(TokenizedDataset):
    """KTO's examples {"input_ids", "labels", "label" (1.0 desirable, 0.0 undesirable)}."""


# ----------------------------------------------------------------------------------------- entry points
def validate_records(path, config, kind: str = "conversation", *, cache_dir: Optional[str | Path] = None) -> None:
    """Read and check every record of a data set read whole (no tokenizer needed) so bad data fails before a model
    is loaded. rlhf_time.data.validation.validate_data_file is the entry point for every kind of data.

    path: a file / source, a list of them, or a DataSpec.
    kind: "conversation", "preference" or "unpaired" (checked by the caller, rlhf_time.data.validation).
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
        for record in (r for chunk in itertools.chain([first], chunks) for r in chunk):
            if fmt == "text":
                text_of(record)
            elif fmt == "preference":
                to_preference(record)
            elif fmt == "unpaired":
                to_unpaired(record)
            else:
                to_messages(record, fmt)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def check_format_fits_kind(first: Record, fmt: str, kind: str, config) -> None:
    """A source's format (of its first record) must be what the stage trains on: pairs, unpaired examples (or pairs,
    which KTO splits) or conversations."""
    if fmt == "text" or fmt in KIND_FORMATS.get(kind, CONVERSATION_FORMATS):
        return
    need = {"preference": "preference pairs {prompt, chosen, rejected}",
            "unpaired": "unpaired examples {prompt, completion, label} or preference pairs"}.get(
                kind, "prompt/response or conversations")
    if config.data_format != "auto":  # the user named the format: the format, not the file, is the mistake
        if kind in KIND_FORMATS:
            fix = f"set data_format: {' or '.join(KIND_FORMATS[kind])} (or auto)"
        else:
            other = "pairs with stage rm or dpo (or kto)" if fmt == "preference" else "unpaired examples with stage kto"
            fix = f"set data_format: auto (or prompt_response, messages, alpaca, sharegpt) for this stage, or train {other}"
        raise RlhfTimeError(f"data_format {fmt} does not suit stage {config.stage!r}, which trains on {need}: {fix}")
    raise RlhfTimeError(f"{first.location}: stage {config.stage!r} needs {need}; this file has "
                        f"fields {field_list(first.data)}")


CONVERSATION_FORMATS = ("prompt_response", "messages", "alpaca", "sharegpt")
KIND_FORMATS = {"preference": ("preference",), "unpaired": ("unpaired", "preference")}


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
    return _load(path, tokenizer, config, cache_dir, max_samples, TokenizedDataset, build_sft)


def load_preference_dataset(path, tokenizer, config, *, cache_dir=None,
                            max_samples: Optional[int] = None) -> PreferenceDataset:
    """Tokenised preference pairs (cached as load_sft_dataset is); only the chosen/rejected reply is a target."""
    return _load(path, tokenizer, config, cache_dir, max_samples, PreferenceDataset, build_preference)


def load_unpaired_dataset(path, tokenizer, config, *, cache_dir=None,
                          max_samples: Optional[int] = None) -> UnpairedDataset:
    """Tokenised KTO examples, each completion labelled desirable or not (pairs give one of each); cached as
    load_sft_dataset is; only the completion is a target."""
    return _load(path, tokenizer, config, cache_dir, max_samples, UnpairedDataset, build_unpaired)


def load_dataset_of_kind(kind: str, path, tokenizer, config, *, cache_dir=None,
                         max_samples: Optional[int] = None) -> TokenizedDataset:
    """The tokenised data set of a stage's data kind ("conversation", "preference", "unpaired" or "prompt")."""
    check_data_kind(kind)
    return DATA_KINDS[kind](path, tokenizer, config, cache_dir=cache_dir, max_samples=max_samples)


def check_data_kind(kind: str) -> None:
    if kind not in DATA_KINDS:
        raise RlhfTimeError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")


# ------------------------------------------------------------------------------------------- loading
def _load(path, tokenizer, config, cache_dir, max_samples, dataset_class: type[TokenizedDataset],
          build: Callable) -> TokenizedDataset:
    spec = as_spec(path)
    cache_dir = cache_dir if cache_dir is not None else config.data_cache_dir
    parts = [_load_source(source, spec.role, tokenizer, config, cache_dir, max_samples, dataset_class, build)
             for source in spec.sources]
    for source, (_, stats) in zip(spec.sources, parts):
        if warning := stats.unknown_tools_warning(source):
            get_logger().warning(warning)  # one line per file, not one per record
    if len(parts) == 1:
        return dataset_class(*parts[0])
    picks = (mixture_indices([len(columns[dataset_class.length_of[0]]) for columns, _ in parts], spec.weights,
                             config.seed)
             if spec.weights else [range(len(columns[dataset_class.length_of[0]])) for columns, _ in parts])
    # The picked rows of each source, not copies: memory-mapped sources stay on disk.
    columns: dict[str, Any] = {key: GatheredRows([part[key] for part, _ in parts], picks) for key in parts[0][0]}
    stats = DataStats(records=sum(s.records for _, s in parts))
    for _, part in parts:
        stats.add_counts(part)
    if spec.weights and "label" in columns:  # a mixture repeats or drops examples: count the labels it kept
        labels = np.asarray([columns["label"][i] for i in range(len(columns["label"]))])
        stats.desirable, stats.undesirable = int((labels > 0.5).sum()), int((labels <= 0.5).sum())
    count_tokens(columns, stats, dataset_class.length_of)
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
    total, records, config = source_chunks(source, role, config, max_samples)
    if cache_file is None:  # rows held as lists
        columns: dict[str, list] = {}
        stats = build_in_chunks(records, total, tokenizer, config, build, source, dataset_class.length_of,
                                lambda part: [columns.setdefault(key, []).extend(rows) for key, rows in part.items()])
        _require_examples(source, stats)
        return columns, stats
    # Each chunk's rows go straight to the cache file, which is then memory-mapped: never all as Python lists.
    try:
        writer = TokenCacheWriter(cache_file)
        try:
            stats = build_in_chunks(records, total, tokenizer, config, build, source, dataset_class.length_of,
                                    writer.add)
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


# How records become examples, and the data set class, of each tokenised data kind (streaming.py uses them too).
BUILDERS: dict[str, Callable] = {"conversation": build_sft, "preference": build_preference,
                                 "unpaired": build_unpaired}
DATA_CLASSES: dict[str, type[TokenizedDataset]] = {"conversation": TokenizedDataset, "preference": PreferenceDataset,
                                                   "unpaired": UnpairedDataset}

# The loader of each data kind a stage can declare.
DATA_KINDS: dict[str, Callable[..., TokenizedDataset]] = {
    "conversation": load_sft_dataset,
    "preference": load_preference_dataset,
    "unpaired": load_unpaired_dataset,  # KTO: labelled completions (rlhf_time.stages.kto)
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
                    max_seq_length=config.max_seq_length, columns=config.columns, list_tools=config.list_tools)
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
            scalars = {name: data[name].tolist() for name in SCALAR_COLUMNS if name in data.files}
        flat = map_npz(cache_file, [f"{name}.flat" for name in names])
        columns: dict[str, Any] = {name: TokenRows(flat[f"{name}.flat"], offsets[name]) for name in names}
        if any(len(rows.flat) != rows.offsets[-1] for rows in columns.values()):
            return None
        columns.update(scalars)
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile):
        return None
    return columns, stats
