"""Read JSONL, JSON and CSV files into records that remember where they came from (for error messages)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf_time.errors import RlhfTimeError

SUPPORTED = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Record:
    """One record of a data file and where it came from, for error messages."""

    location: str  # e.g. "data/train.jsonl line 7"
    data: dict[str, Any]


def check_data_path(path: str | Path) -> Path:
    """The path, if it names an existing file of a supported type; else a RlhfTimeError saying which is wrong."""
    path = Path(path)
    if path.is_dir():
        raise RlhfTimeError(f"{path}: is a directory; give a data file ({', '.join(SUPPORTED)})")
    if not path.is_file():
        raise RlhfTimeError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise RlhfTimeError(f"{path}: unsupported data file type {suffix or '(none)'}; use {', '.join(SUPPORTED)}")
    return path


def read_records(path: str | Path) -> list[Record]:
    """All records of a .jsonl / .json / .csv file (UTF-8); any problem is one RlhfTimeError naming the place.

    Locations count from 1: `train.jsonl line 7` (blank lines skipped but counted), `train.json record 3`
    (the third record), `train.csv row 4` (the header is row 1, as spreadsheets number rows).
    """
    path = check_data_path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise RlhfTimeError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[suffix](path, text)
    if not records:
        raise RlhfTimeError(f"{path}: empty data set (no records)")
    return records


def _jsonl(path: Path, text: str) -> list[Record]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on.
    return [_jsonl_record(path, number, line) for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()]


def _jsonl_record(path: Path, number: int, line: str) -> Record:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise RlhfTimeError(f"{path} line {number}: malformed JSON ({error.msg} at column {error.colno})") from None
    return _as_record(value, f"{path} line {number}")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, read a line at a time: the lines and numbers of
    text.split("\n") in read_records, so records, locations and errors are the same."""
    offset = 0
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):  # binary lines end at b"\n" only, as split("\n") does
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise RlhfTimeError(f"{path}: not UTF-8 text ({error.reason} at byte {offset + error.start})") from None
            offset += len(raw)
            if line.strip():
                yield number, line


def count_jsonl_records(path: str | Path) -> int:
    """The number of records of a .jsonl file (its non-blank lines), checking it is UTF-8 and not empty."""
    path = check_data_path(path)
    count = sum(1 for _ in _jsonl_lines(path))
    if not count:
        raise RlhfTimeError(f"{path}: empty data set (no records)")
    return count


def iter_jsonl_records(path: str | Path) -> Iterator[Record]:
    """The records of a .jsonl file one at a time (the records read_records gives, without holding them all)."""
    path = check_data_path(path)
    return (_jsonl_record(path, number, line) for number, line in _jsonl_lines(path))


def _json(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RlhfTimeError(f"{path} line {error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    if isinstance(value, dict):
        if not isinstance(value.get("data"), list):
            raise RlhfTimeError(f'{path}: expected a list of records or {{"data": [...]}}, got keys {sorted(value)}')
        value = value["data"]
    if not isinstance(value, list):
        raise RlhfTimeError(f"{path}: expected a list of records, got {type(value).__name__}")
    return [_as_record(item, f"{path} record {number}") for number, item in enumerate(value, start=1)]


def _csv(path: Path, text: str) -> list[Record]:
    # Quoted fields may hold newlines. strict: a quote that is never closed is an error at the row where it
    # opened, instead of silently swallowing the rest of the file into one field.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    # Row numbers count the header as row 1, as spreadsheets show them.
    records: list[Record] = []
    header_read = False
    try:
        if not reader.fieldnames:
            return []
        header_read = True
        reader.fieldnames = [name.strip() for name in reader.fieldnames]  # "prompt, response" is a common header
        for number, row in enumerate(reader, start=2):
            records.append(Record(f"{path} row {number}", {k: v for k, v in row.items() if k is not None}))
    except csv.Error as error:
        row, line = (len(records) + 2 if header_read else 1), reader.line_num + 1
        reason = "a quote opened in this row is never closed" if "end of data" in str(error) else str(error)
        raise RlhfTimeError(f"{path} row {row} (line {line}): malformed CSV ({reason})") from None
    return records


def field_list(data: dict[str, Any]) -> str:
    """The record's field names for a one-line message (odd names, e.g. with a newline, shown quoted)."""
    return ", ".join(name if name.isprintable() else repr(name) for name in sorted(map(str, data)))


def _as_record(value: Any, location: str) -> Record:
    if not isinstance(value, dict):
        raise RlhfTimeError(f"{location}: expected a JSON object, got {type(value).__name__}")
    return Record(location, value)
