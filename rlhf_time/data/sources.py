"""Where data comes from: local files, `datasets` folders and Hub data sets, with column mapping.

A source (one entry of `train_file` / `eval_file`) is one of:
  - a .jsonl / .json / .csv file: read by readers.py, errors name the line / record / row;
  - a .parquet file, a folder written by `datasets.Dataset(Dict).save_to_disk`, a local Hub-style data set
    folder (data files such as data/train-00000-of-00001.parquet, optionally a README declaring subsets), or
    `hf://datasets/ORG/NAME`: read through `datasets` (Arrow, memory-mapped, cached by `datasets` itself);
    errors name the source, the split and the row (row 1 = the first record).
Every record then passes through the `columns` mapping, so the rest of the pipeline sees this tool's field names.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from rlhf_time.data.readers import Record, count_jsonl_records, field_list, iter_jsonl_records, read_records
from rlhf_time.downloads import download_progress
from rlhf_time.errors import RlhfTimeError

HUB_PREFIX = "hf://datasets/"
# Fields a record may lack; a `columns` entry for them is used where the data has the column.
OPTIONAL_FIELDS = ("system", "input", "margin")
# Which split to evaluate on when eval_split is not set and the data set has several.
EVAL_SPLIT_NAMES = ("validation", "valid", "dev", "test")
_ROWS_PER_BATCH = 1000


@dataclass(frozen=True)
class DataSpec:
    """The sources of one data set, whether it is read for training or evaluation (which split setting applies),
    and the mixture weights (None: the sources are concatenated)."""

    sources: tuple[str, ...]
    role: str = "train"  # "train" | "eval"
    weights: Optional[tuple[float, ...]] = None


def as_spec(data: Any) -> DataSpec:
    """A DataSpec from a DataSpec, one path / source string, or a list of them (read for training)."""
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, (list, tuple)):
        return DataSpec(tuple(str(source) for source in data))
    return DataSpec((str(data),))


def _listed(value) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def train_spec(config) -> Optional[DataSpec]:
    if not config.train_file:
        return None
    weights = tuple(config.mix_weights) if config.mix_weights else None
    return DataSpec(_listed(config.train_file), "train", weights)


def eval_spec(config) -> Optional[DataSpec]:
    """eval_file's sources; without eval_file but with eval_split, that split of the train_file sources."""
    if config.eval_file:
        return DataSpec(_listed(config.eval_file), "eval")
    if config.eval_split and config.train_file:
        return DataSpec(_listed(config.train_file), "eval")
    return None


# ------------------------------------------------------------------------------------------- sources
def source_kind(source: str) -> str:
    """'file' (.jsonl/.json/.csv, or a path readers.py will report on), 'parquet', 'disk', 'folder' or 'hub'."""
    if source.startswith(HUB_PREFIX):
        return "hub"
    path = Path(source)
    if path.is_dir():
        return "disk" if _saved_to_disk(path) else "folder"
    if path.suffix.lower() == ".parquet":
        return "parquet"
    return "file"


def _saved_to_disk(folder: Path) -> bool:
    """Written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def source_label(source: str) -> str:
    """A short file-name-safe name of a source (for cache file names)."""
    name = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else Path(source).stem or Path(source).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "data"


def read_source(source: str, config, role: str = "train") -> list[Record]:
    """Every record of a source, with `columns` applied; one RlhfTimeError naming the place on any problem."""
    _, chunks = record_chunks(source, config, role)
    return [record for chunk in chunks for record in chunk]


def record_chunks(source: str, config, role: str = "train", *, limit: Optional[int] = None,
                  size: int = _ROWS_PER_BATCH) -> tuple[int, Iterator[list[Record]]]:
    """(number of records, the records in consecutive lists of `size`), `columns` applied, at most `limit`.

    A `datasets` source is read from its memory-mapped Arrow table one chunk at a time, and a .jsonl file a line
    at a time (after one pass that counts its records), so a large data set is never held as Python objects all
    at once. .json and .csv files are parsed whole.
    """
    kind = source_kind(source)
    columns = getattr(config, "columns", None) or {}
    if kind == "file" and Path(source).suffix.lower() == ".jsonl":
        _check_eval_split_applies(source, config, role)
        total = count_jsonl_records(source)
        total = min(total, limit) if limit else total
        records = (Record(r.location, apply_columns(r.data, columns, r.location))
                   for r in itertools.islice(iter_jsonl_records(source), total))
        return total, iter(lambda: list(itertools.islice(records, size)), [])
    if kind == "file":
        _check_eval_split_applies(source, config, role)
        records = [Record(r.location, apply_columns(r.data, columns, r.location)) for r in read_records(source)]
        records = records[:limit] if limit else records
        return len(records), (records[i : i + size] for i in range(0, len(records), size))
    dataset, label = open_dataset(source, config, role)
    if len(dataset) == 0:
        raise RlhfTimeError(f"{label}: empty data set (no records)")
    if columns:  # Arrow tables have the same columns in every row: check once, name the source
        apply_columns(dict.fromkeys(dataset.column_names), columns, label)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))

    def chunks() -> Iterator[list[Record]]:
        number = 0
        for batch in dataset.iter(batch_size=size):
            names, chunk = list(batch), []
            for values in zip(*(batch[name] for name in names)):
                number += 1
                location = f"{label} row {number}"
                # Arrow gives every row every column, null where a record had no such field: drop those, so a
                # row means what the same record means in JSONL (and the format is detected the same way).
                data = {name: value for name, value in zip(names, values) if value is not None}
                chunk.append(Record(location, apply_columns(data, columns, location)))
            yield chunk

    return len(dataset), chunks()


def open_dataset(source: str, config, role: str = "train"):
    """(datasets.Dataset of the chosen split, label naming source and split) for a non-file source."""
    import datasets

    kind = source_kind(source)
    subset = getattr(config, "dataset_subset", None)
    try:
        if kind == "parquet":
            if not Path(source).is_file():
                raise RlhfTimeError(f"{source}: data file not found")
            loaded = datasets.load_dataset("parquet", data_files=str(source), split="train")
        elif kind == "disk":
            loaded = datasets.load_from_disk(source)
        elif kind in ("folder", "hub"):
            with download_progress():  # a Hub data set is downloaded on first use
                loaded = datasets.load_dataset(source[len(HUB_PREFIX):] if kind == "hub" else source, name=subset)
        else:
            raise RlhfTimeError(f"{source}: not a datasets source")
    except RlhfTimeError:
        raise
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, ValueError, ArrowInvalid, ...)
        message = (str(error).strip().splitlines() or [""])[0][:300]
        raise RlhfTimeError(f"{source}: cannot load it with datasets ({type(error).__name__}: {message})") from None
    wanted = config.eval_split if role == "eval" else config.train_split
    if isinstance(loaded, datasets.DatasetDict):
        split = choose_split(list(loaded), wanted, role, source)
        return loaded[split], f"{source} [{split}]"
    _check_eval_split_applies(source, config, role)
    return loaded, source


def _check_eval_split_applies(source: str, config, role: str) -> None:
    """Evaluating on eval_split of the training data needs a source with splits (else eval data = train data)."""
    if role == "eval" and config.eval_split and not config.eval_file:
        raise RlhfTimeError(f"{source}: has no splits, so eval_split={config.eval_split!r} cannot select evaluation "
                            f"data from it; set eval_file")


def choose_split(splits: Sequence[str], wanted: Optional[str], role: str, source: str) -> str:
    """The configured split; else 'train' (training) or validation/valid/dev/test (evaluation), else the only one."""
    setting = "eval_split" if role == "eval" else "train_split"
    if wanted is not None:
        if wanted not in splits:
            raise RlhfTimeError(f"{source}: no split {wanted!r} ({setting}); splits: {', '.join(splits)}")
        return wanted
    if len(splits) == 1:
        return splits[0]
    for name in ("train",) if role == "train" else EVAL_SPLIT_NAMES:
        if name in splits:
            return name
    raise RlhfTimeError(f"{source}: several splits ({', '.join(splits)}); choose one with {setting}")


def apply_columns(data: dict[str, Any], columns: dict[str, str], location: str) -> dict[str, Any]:
    """The record under this tool's field names: each `columns` entry {field: column} renames column -> field.

    A source that already uses the tool's own name for a field keeps it (so one mapping serves a mixture of
    sources). A required field whose column is absent is an error naming the column and the columns present.
    """
    if not columns:
        return data
    mapped = {key: value for key, value in data.items() if key not in columns.values()}
    for field, column in columns.items():
        if column in data:
            mapped[field] = data[column]
        elif field in data:
            mapped[field] = data[field]
        elif field not in OPTIONAL_FIELDS:
            raise RlhfTimeError(f"{location}: no column {column!r} (columns maps {field} -> {column!r}); "
                                f"columns present: {field_list(data) or 'none'}")
    return mapped


# --------------------------------------------------------------------------------------- fingerprints
def fingerprint(source: str, config, role: str = "train") -> str:
    """An id of a source's content: SHA-256 of a file's bytes, or the Arrow fingerprint `datasets` gives a split."""
    kind = source_kind(source)
    if kind in ("file", "parquet"):
        return _file_sha256(Path(source))
    dataset, label = open_dataset(source, config, role)
    return f"{label}:{dataset._fingerprint}"


def _file_sha256(path: Path) -> str:
    """Hash of the file's bytes (not size + mtime: an edit within the clock's resolution must still count)."""
    from rlhf_time.data.readers import check_data_path

    if path.suffix.lower() != ".parquet":
        check_data_path(path)  # the precise "not found" / "unsupported type" message
    elif not path.is_file():
        raise RlhfTimeError(f"{path}: data file not found")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
