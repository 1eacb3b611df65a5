"""Data sets ready for the trainer: read, convert, tokenise, truncate, count, and cache the result."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rlhf_time.data.formats import detect_format, prompt_of, to_messages, to_preference
from rlhf_time.data.readers import Record, read_records
from rlhf_time.data.tokenize import ConversationEncoder, has_target, truncate
from rlhf_time.errors import RlhfTimeError

CACHE_VERSION = "1"
PREFERENCE_STAGES = ("rm", "dpo")


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    identical_pairs_dropped: int = 0
    target_tokens: int = 0
    total_tokens: int = 0

    def summary(self) -> str:
        text = (f"{self.examples} examples from {self.records} records, {self.total_tokens} tokens "
                f"({self.target_tokens} trained), {self.truncated} truncated, {self.dropped} dropped (no target left)")
        if self.identical_pairs_dropped:
            text += f", {self.identical_pairs_dropped} pairs dropped (chosen == rejected)"
        return text


class TokenizedDataset:
    """Examples {"input_ids", "labels"} (lists of ints) with their lengths and the statistics of how they were made."""

    def __init__(self, columns: dict[str, list], stats: DataStats, length_of: tuple[str, ...] = ("input_ids",)) -> None:
        self.columns = columns
        self.stats = stats
        first = next(iter(columns.values()))
        self.lengths = [max(len(columns[key][i]) for key in length_of) for i in range(len(first))]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: values[index] for key, values in self.columns.items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


PreferenceDataset = TokenizedDataset


def validate_data_file(path: str | Path, config) -> list[Record]:
    """Read and check every record (no tokenizer needed) so bad data fails before a model is loaded."""
    records = read_records(path)
    fmt = detect_format(records[0], config.data_format)
    wants_pairs = config.stage in PREFERENCE_STAGES
    if wants_pairs != (fmt == "preference"):
        need = "preference pairs {prompt, chosen, rejected}" if wants_pairs else "prompt/response or conversations"
        raise RlhfTimeError(f"{records[0].location}: stage {config.stage!r} needs {need}; this file has "
                            f"fields {', '.join(sorted(records[0].data))}")
    for record in records:
        to_preference(record) if wants_pairs else to_messages(record, fmt)
    return records


def read_prompts(path: str | Path) -> list[str]:
    """Prompts for `rlhf-time predict`: a .txt file (one per line) or the prompt field of any record format."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise RlhfTimeError(f"{path}: prompt file not found")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise RlhfTimeError(f"{path}: no prompts")
        return prompts
    return [prompt_of(record) for record in read_records(path)]


def load_sft_dataset(path, tokenizer, config, *, cache_dir=None, max_samples: Optional[int] = None) -> TokenizedDataset:
    """Tokenised SFT examples (cached); labels are -100 except on assistant replies and their end-of-turn token."""
    return _cached(path, tokenizer, config, cache_dir, max_samples, "sft", _build_sft)


def load_preference_dataset(path, tokenizer, config, *, cache_dir=None, max_samples: Optional[int] = None) -> TokenizedDataset:
    """Tokenised preference pairs (cached): chosen_/rejected_ input_ids and labels, and the optional margin."""
    return _cached(path, tokenizer, config, cache_dir, max_samples, "preference", _build_preference)


def _encoder(tokenizer, config) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                               response_template=config.response_template, system_prompt=config.system_prompt,
                               max_seq_length=config.max_seq_length)


def _build_sft(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    encoder = _encoder(tokenizer, config)
    fmt = detect_format(records[0], config.data_format)
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


def _build_preference(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    encoder = _encoder(tokenizer, config)
    pairs = [to_preference(r) for r in records]
    stats = DataStats(records=len(records))
    kept = [(r, p) for r, p in zip(records, pairs) if p.chosen != p.rejected]
    stats.identical_pairs_dropped = len(pairs) - len(kept)
    segments = []
    for record, pair in kept:
        for reply in (pair.chosen, pair.rejected):
            segments.append(encoder.segments([*pair.prompt_messages, {"role": "assistant", "content": reply}],
                                             record.location))
    encoded = encoder.encode_many(segments)
    columns: dict[str, list] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                "rejected_labels", "margin")}
    for index, (_, pair) in enumerate(kept):
        chosen = truncate(*encoded[2 * index], config.max_seq_length)
        rejected = truncate(*encoded[2 * index + 1], config.max_seq_length)
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


# ------------------------------------------------------------------------------------------------- cache
def _cached(path, tokenizer, config, cache_dir, max_samples, kind, build) -> TokenizedDataset:
    path = Path(path)
    length_of = ("input_ids",) if kind == "sft" else ("chosen_input_ids", "rejected_input_ids")
    key = _cache_key(path, tokenizer, config, max_samples, kind)
    cache_file = Path(cache_dir) / f"{path.stem}-{kind}-{key}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        columns, stats = _load(cache_file)
        return TokenizedDataset(columns, stats, length_of)
    records = read_records(path)[:max_samples] if max_samples else read_records(path)
    columns, stats = build(records, tokenizer, config)
    stats.examples = len(columns[length_of[0]])
    for key_name in length_of:
        stats.total_tokens += sum(map(len, columns[key_name]))
        stats.target_tokens += sum(sum(1 for t in labels[1:] if t != -100)
                                   for labels in columns[key_name.replace("input_ids", "labels")])
    if stats.examples == 0:
        raise RlhfTimeError(f"{path}: empty data set after tokenisation ({stats.summary()}); "
                            f"raise max_seq_length or check the data")
    if cache_file is not None:
        _save(cache_file, columns, stats)
    return TokenizedDataset(columns, stats, length_of)


def _cache_key(path: Path, tokenizer, config, max_samples, kind) -> str:
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    settings = dict(version=CACHE_VERSION, kind=kind, max_samples=max_samples, chat_template=tokenizer.chat_template,
                    special=tokenizer.special_tokens_map, data_format=config.data_format,
                    prompt_template=config.prompt_template, response_template=config.response_template,
                    system_prompt=config.system_prompt, max_seq_length=config.max_seq_length)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _save(cache_file: Path, columns: dict[str, list], stats: DataStats) -> None:
    arrays: dict[str, np.ndarray] = {"stats": np.array(json.dumps(asdict(stats)))}
    for name, values in columns.items():
        if name == "margin":
            arrays[name] = np.asarray(values, dtype=np.float64)
            continue
        arrays[f"{name}.flat"] = np.fromiter((t for row in values for t in row), dtype=np.int64)
        arrays[f"{name}.offsets"] = np.cumsum([0, *map(len, values)], dtype=np.int64)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".", suffix=".npz", dir=cache_file.parent)
    os.close(handle)
    np.savez(temp, **arrays)
    os.replace(temp, cache_file)


def _load(cache_file: Path) -> tuple[dict[str, list], DataStats]:
    with np.load(cache_file, allow_pickle=False) as data:
        stats = DataStats(**json.loads(str(data["stats"])))
        columns: dict[str, list] = {}
        for name in data.files:
            if name.endswith(".flat"):
                base = name[: -len(".flat")]
                flat, offsets = data[name].tolist(), data[f"{base}.offsets"].tolist()
                columns[base] = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
            elif name == "margin":
                columns[name] = [float(m) if not math.isnan(m) else math.nan for m in data[name].tolist()]
    return columns, stats
