"""Records -> tokenised example columns and their statistics: the builder of each data kind, run over a source's
records chunk by chunk, in num_proc processes."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from rlhf_time.data.formats import detect_format, to_messages, to_preference, to_unpaired, unpair
from rlhf_time.data.readers import Record
from rlhf_time.data.sources import record_chunks
from rlhf_time.data.text import encode_documents, text_of
from rlhf_time.data.token_store import row_lengths, targets_per_row
from rlhf_time.data.tool_calls import record_tools, unknown_tool_calls
from rlhf_time.data.tokenize import ConversationEncoder, has_target, tokenize_preference_pairs, truncate

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
    desirable: int = 0  # unpaired (KTO) examples labelled true / false
    undesirable: int = 0
    unknown_tool_calls: int = 0  # tool calls naming a tool missing from their record's `tools` (warned, kept)
    first_unknown_tool: str = ""  # where the first of those is: "file line N: 'name'"

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
        if self.desirable or self.undesirable:
            text += f"; {self.desirable} desirable, {self.undesirable} undesirable"
        return text

    def add_counts(self, other: "DataStats") -> None:
        """Add the counts of another part of the same data set (examples and tokens are counted from columns)."""
        for name in ("truncated", "dropped", "identical_pairs_dropped", "desirable", "undesirable", "unknown_tool_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_unknown_tool = self.first_unknown_tool or other.first_unknown_tool

    def unknown_tools_warning(self, source: str) -> str:
        """The one line logged for a data file whose tool calls name tools its records do not list ("" if none)."""
        if not self.unknown_tool_calls:
            return ""
        return (f"{source}: {self.unknown_tool_calls} tool calls name a tool that is not in their record's 'tools' "
                f"(first: {self.first_unknown_tool}); they are trained as written")


# ------------------------------------------------------------------------------------------ building
def _encoder(tokenizer, config) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, prompt_template=config.prompt_template,
                               response_template=config.response_template, system_prompt=config.system_prompt,
                               max_seq_length=config.max_seq_length)


def build_sft(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    """Columns input_ids, labels of SFT examples (data_format text: continued pre-training blocks)."""
    fmt = detect_format(records[0], config.data_format)
    if fmt == "text":
        return _build_text(records, tokenizer, config)
    encoder = _encoder(tokenizer, config)
    stats = DataStats(records=len(records))
    segments = []
    for record in records:
        messages, tools = to_messages(record, fmt), record_tools(record)
        unknown = unknown_tool_calls(messages, tools)
        tools = tools if config.list_tools else None  # calls and results are laid out either way
        if unknown and not stats.unknown_tool_calls:
            stats.first_unknown_tool = f"{record.location}: {unknown[0]!r}"
        stats.unknown_tool_calls += len(unknown)
        segments.append(encoder.segments(messages, record.location, tools=tools))
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for _, input_ids, labels in _kept(encoder.encode_many(segments), config.max_seq_length, stats):
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
    return columns, stats


def _kept(encoded, max_length: int, stats: DataStats):
    """(index, input_ids, labels) of each encoded example, cut to max_length, that still has a target; the cut and
    the dropped ones are counted in stats."""
    for index, (input_ids, labels) in enumerate(encoded):
        input_ids, labels, cut = truncate(input_ids, labels, max_length)
        stats.truncated += cut
        if not has_target(labels):
            stats.dropped += 1
            continue
        yield index, input_ids, labels


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


def build_preference(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    """Columns chosen/rejected input_ids and labels, and margin, of preference pairs."""
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


def build_unpaired(records: list[Record], tokenizer, config) -> tuple[dict[str, list], DataStats]:
    """Columns input_ids, labels and label (1.0 desirable, 0.0 undesirable) of KTO's unpaired examples. Preference
    pairs become a desirable and an undesirable example: the chunk's chosen completions, then its rejected ones
    (as TRL's unpair_preference_dataset orders them)."""
    encoder = _encoder(tokenizer, config)
    if detect_format(records[0], config.data_format) == "preference":
        pairs = [unpair(to_preference(r)) for r in records]
        examples = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
        locations = [r.location for r in records] * 2
    else:
        examples, locations = [to_unpaired(r) for r in records], [r.location for r in records]
    segments = [encoder.segments([*e.prompt_messages, {"role": "assistant", "content": e.completion}], location,
                                 last_turn_only=True) for e, location in zip(examples, locations)]
    stats = DataStats(records=len(records))
    columns: dict[str, list] = {"input_ids": [], "labels": [], "label": []}
    for index, input_ids, labels in _kept(encoder.encode_many(segments), config.max_seq_length, stats):
        example = examples[index]
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels)
        columns["label"].append(1.0 if example.desirable else 0.0)
        stats.desirable += example.desirable
        stats.undesirable += not example.desirable
    return columns, stats


def count_tokens(columns: dict[str, list], stats: DataStats, length_of: tuple[str, ...]) -> None:
    """Set stats' examples, total_tokens and target_tokens from the columns (length_of: the input_ids columns)."""
    stats.total_tokens = stats.target_tokens = 0
    for ids_key in length_of:
        labels_key = ids_key.replace("input_ids", "labels")
        stats.total_tokens += int(row_lengths(columns[ids_key]).sum())
        stats.target_tokens += int(targets_per_row(columns[labels_key]).sum())
    stats.examples = len(columns[length_of[0]])


# ------------------------------------------------------------------------------- parallel tokenisation
def source_chunks(source: str, role: str, config,
                  max_samples: Optional[int]) -> tuple[int, Iterator[list[Record]], Any]:
    """A source's number of records, its records in chunks of RECORDS_PER_CHUNK, and config with data_format set
    to the source's format."""
    total, chunks = record_chunks(source, config, role, limit=max_samples, size=RECORDS_PER_CHUNK)
    first = next(chunks)
    # The format is the source's (its first record's), not each chunk's.
    config = config.model_copy(update={"data_format": detect_format(first[0], config.data_format)})
    return total, itertools.chain([first], chunks), config


_worker_job: Optional[tuple[Callable, Any, Any]] = None  # (build, tokenizer, config), inherited by forked workers


def _build_chunk(records: list[Record]) -> tuple[dict[str, list], DataStats]:
    build, tokenizer, config = _worker_job
    return build(records, tokenizer, config)


def build_in_chunks(chunks: Iterator[list[Record]], total: int, tokenizer, config, build: Callable, source: str,
                    length_of: tuple[str, ...], add: Callable[[dict[str, list]], Any]) -> DataStats:
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
        count_tokens(columns, counted, length_of)
        stats.examples += counted.examples
        stats.total_tokens += counted.total_tokens
        stats.target_tokens += counted.target_tokens
        stats.add_counts(part)

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
