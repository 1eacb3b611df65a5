"""Data sets ready for the trainer: read, convert, tokenise, truncate, count, and cache the result."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from rlhf_time.data.formats import detect_format, prompt_of, to_messages, to_preference
from rlhf_time.data.readers import Record, check_data_path, read_records
from rlhf_time.data.tokenize import (IGNORE_INDEX, ConversationEncoder, has_target, tokenize_preference_pairs,
                                     truncate)
from rlhf_time.errors import RlhfTimeError

CACHE_VERSION = "3"  # bump when the tokenised result of the same inputs changes


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
    """SFT examples {"input_ids", "labels"} (lists of ints), their lengths, and the statistics of how they were made."""

    length_of: tuple[str, ...] = ("input_ids",)

    def __init__(self, columns: dict[str, list], stats: DataStats) -> None:
        self.columns = columns
        self.stats = stats
        rows = zip(*(columns[key] for key in self.length_of))
        self.lengths = [max(map(len, row)) for row in rows]

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
def validate_data_file(path: str | Path, config, kind: str = "conversation") -> list[Record]:
    """Read and check every record (no tokenizer needed) so bad data fails before a model is loaded.

    kind: the data kind the stage trains on (its trainer's `data_kind`): "conversation" or "preference".
    """
    _check_kind(kind)
    records = read_records(path)
    fmt = detect_format(records[0], config.data_format)
    wants_pairs = kind == "preference"
    if wants_pairs != (fmt == "preference"):
        need = "preference pairs {prompt, chosen, rejected}" if wants_pairs else "prompt/response or conversations"
        raise RlhfTimeError(f"{records[0].location}: stage {config.stage!r} needs {need}; this file has "
                            f"fields {', '.join(sorted(records[0].data))}")
    for record in records:
        to_preference(record) if wants_pairs else to_messages(record, fmt)
    return records


def read_prompts(path: str | Path) -> list[str]:
    """Prompts for `rlhf-time predict`: a .txt file (one per line, blank lines skipped) or, for .jsonl/.json/.csv,
    each record's `prompt`, `instruction` (+ "\\n\\n" + input), or last user message of `messages`/`conversations`."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise RlhfTimeError(f"{path}: prompt file not found")
        prompts = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not prompts:
            raise RlhfTimeError(f"{path}: no prompts (the file is empty)")
        return prompts
    return [prompt_of(record) for record in read_records(path)]


def load_sft_dataset(path, tokenizer, config, *, cache_dir=None, max_samples: Optional[int] = None) -> TokenizedDataset:
    """Tokenised SFT examples; labels are -100 except on assistant replies and the end-of-turn token closing each.

    Cached under cache_dir, or config.data_cache_dir when cache_dir is None (no cache when both are None).
    max_samples keeps the first N records.
    """
    return _load(path, tokenizer, config, cache_dir, max_samples, TokenizedDataset, _build_sft)


def load_preference_dataset(path, tokenizer, config, *, cache_dir=None,
                            max_samples: Optional[int] = None) -> PreferenceDataset:
    """Tokenised preference pairs (cached as load_sft_dataset is); only the chosen/rejected reply is a target."""
    return _load(path, tokenizer, config, cache_dir, max_samples, PreferenceDataset, _build_preference)


def load_dataset_of_kind(kind: str, path, tokenizer, config, *, cache_dir=None,
                         max_samples: Optional[int] = None) -> TokenizedDataset:
    """The tokenised data set of a stage's data kind ("conversation" or "preference")."""
    _check_kind(kind)
    return DATA_KINDS[kind](path, tokenizer, config, cache_dir=cache_dir, max_samples=max_samples)


def _check_kind(kind: str) -> None:
    if kind not in DATA_KINDS:
        raise RlhfTimeError(f"unknown data kind {kind!r}; known: {', '.join(DATA_KINDS)}")


# ------------------------------------------------------------------------------------------ building
def _encoder(tokenizer, config) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                               response_template=config.response_template, system_prompt=config.system_prompt,
                               max_seq_length=config.max_seq_length)


def _progress(items, config, total: Optional[int] = None):
    """A tokenisation bar (templates are rendered per record in Python: ~25 s for 100k records)."""
    from tqdm.auto import tqdm

    total = total if total is not None else len(items)
    return tqdm(items, total=total, desc="tokenize", unit="rec", leave=False, dynamic_ncols=True, mininterval=0.5,
                disable=getattr(config, "disable_progress_bar", False) or total < 1000)


def _build_sft(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    encoder = _encoder(tokenizer, config)
    fmt = detect_format(records[0], config.data_format)
    segments = [encoder.segments(to_messages(r, fmt), r.location) for r in _progress(records, config)]
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


def _build_preference(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    encoder = _encoder(tokenizer, config)
    pairs = [to_preference(r) for r in records]
    stats = DataStats(records=len(records))
    kept = [(r, p) for r, p in zip(records, pairs) if p.chosen != p.rejected]
    stats.identical_pairs_dropped = stats.dropped = len(pairs) - len(kept)
    encoded = tokenize_preference_pairs([p for _, p in kept], encoder, [r.location for r, _ in kept],
                                        progress=lambda items: _progress(items, config, total=len(kept)))
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
    path = check_data_path(path)
    kind = dataset_class.__name__
    cache_dir = cache_dir if cache_dir is not None else config.data_cache_dir
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(path, tokenizer, config, max_samples, kind)
        cache_file = Path(cache_dir) / f"{path.stem}-{kind}-{key}.npz"
        cached = _read_cache(cache_file)
        if cached is not None:
            return dataset_class(*cached)
    records = read_records(path)
    if max_samples:
        records = records[:max_samples]
    columns, stats = build(records, tokenizer, config)
    for ids_key in dataset_class.length_of:
        labels_key = ids_key.replace("input_ids", "labels")
        stats.total_tokens += sum(map(len, columns[ids_key]))
        stats.target_tokens += sum(len(labels) - 1 - labels[1:].count(IGNORE_INDEX) for labels in columns[labels_key])
    stats.examples = len(columns[dataset_class.length_of[0]])
    if stats.examples == 0:
        raise RlhfTimeError(f"{path}: empty data set after tokenisation ({stats.summary()}); "
                            f"raise max_seq_length or check the data")
    if cache_file is not None:
        _write_cache(cache_file, columns, stats)
    return dataset_class(columns, stats)


# The loader of each data kind a stage can declare.
DATA_KINDS: dict[str, Callable[..., TokenizedDataset]] = {
    "conversation": load_sft_dataset,
    "preference": load_preference_dataset,
}


# ------------------------------------------------------------------------------------------------- cache
def _cache_key(path: Path, tokenizer, config, max_samples, kind) -> str:
    """Hash of everything the tokenised result depends on: file bytes, tokenizer, and the data settings."""
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    settings = dict(version=CACHE_VERSION, kind=kind, max_samples=max_samples, tokenizer=type(tokenizer).__name__,
                    chat_template=tokenizer.chat_template, special=tokenizer.special_tokens_map,
                    data_format=config.data_format, prompt_template=config.prompt_template,
                    response_template=config.response_template, system_prompt=config.system_prompt,
                    max_seq_length=config.max_seq_length)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _write_cache(cache_file: Path, columns: dict[str, list], stats: DataStats) -> None:
    """Flat int32 token arrays + int64 offsets per column, in an .npz written to a temp file then renamed."""
    arrays: dict[str, np.ndarray] = {"stats": np.array(json.dumps(asdict(stats)))}
    for name, rows in columns.items():
        if name == "margin":
            arrays[name] = np.asarray(rows, dtype=np.float64)
            continue
        arrays[f"{name}.flat"] = np.fromiter((t for row in rows for t in row), dtype=np.int32)
        arrays[f"{name}.offsets"] = np.cumsum([0, *map(len, rows)], dtype=np.int64)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{cache_file.stem}-", suffix=".tmp", dir=cache_file.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temp, cache_file)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read_cache(cache_file: Path) -> Optional[tuple[dict[str, list], DataStats]]:
    """The cached columns and stats, or None when absent or unreadable (then it is rebuilt and rewritten)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            stats = DataStats(**json.loads(str(data["stats"])))
            columns: dict[str, list] = {}
            for name in data.files:
                if name.endswith(".flat"):
                    base = name[: -len(".flat")]
                    flat, offsets = data[name].tolist(), data[f"{base}.offsets"].tolist()
                    columns[base] = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
                elif name == "margin":
                    columns[name] = data[name].tolist()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    return columns, stats
