"""Token rows kept on disk: the tokenised cache (.npz of flat int32 arrays + int64 offsets) memory-mapped.

A data set of 100M tokens held as Python lists of ints costs ~36 bytes per token per column (a pointer and an
int object each); memory-mapped from the cache it costs 4 bytes per token of page cache, which the kernel shares
and can drop, plus 8 bytes of offsets per example. Rows are read as Python lists on access, so the examples
(and everything made from them) are exactly those of the lists.

np.savez stores each array uncompressed in the zip, so an array's bytes lie contiguous in the file: they are
mapped directly at their offset (after the zip member's local header and the .npy header).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rlhf_time.constants import IGNORE_INDEX

SCALAR_COLUMNS = ("margin", "label")  # one float per example (a pair's margin, KTO's label), not token rows
_LOCAL_HEADER = 30  # bytes of a zip local file header before its file name and extra field


class TokenRows:
    """Rows of token ids: row i is flat[offsets[i]:offsets[i + 1]], returned as a list of ints."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> list[int]:
        return self.flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def targets_per_row(self, block_tokens: int = 1 << 24) -> np.ndarray:
        """Per row, the labels that are trained on: != -100 at positions 1.. (position 0 predicts nothing).
        Computed over blocks of rows of about block_tokens tokens, so memory stays bounded."""
        counts, first = np.zeros(len(self), dtype=np.int64), 0
        while first < len(self):
            last = max(first + 1, int(np.searchsorted(self.offsets, self.offsets[first] + block_tokens, "right")) - 1)
            last = min(last, len(self))
            base, bounds = self.offsets[first], self.offsets[first : last + 1] - self.offsets[first]
            trained = np.asarray(self.flat[base : base + bounds[-1]]) != IGNORE_INDEX
            trained[bounds[:-1][bounds[1:] > bounds[:-1]]] = False  # each non-empty row's first position
            running = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
            counts[first:last] = running[bounds[1:]] - running[bounds[:-1]]
            first = last
        return counts


class GatheredRows:
    """The rows picked from several row sequences, in order: parts[k][indices[k][j]] for each k, then each j
    (a mixture or concatenation of sources without copying their tokens)."""

    def __init__(self, parts: Sequence[Sequence], indices: Sequence[Sequence[int]]) -> None:
        self.parts = list(parts)
        self.indices = [np.asarray(list(picked), dtype=np.int64) for picked in indices]
        self.ends = np.cumsum([len(picked) for picked in self.indices])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        part = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[part - 1]) if part else 0
        return self.parts[part][int(self.indices[part][index - start])]

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        return np.concatenate([row_lengths(part)[picked] for part, picked in zip(self.parts, self.indices)])

    def targets_per_row(self) -> np.ndarray:
        return np.concatenate([targets_per_row(part)[picked] for part, picked in zip(self.parts, self.indices)])


def row_lengths(rows: Sequence[Sequence[int]]) -> np.ndarray:
    if isinstance(rows, (TokenRows, GatheredRows)):
        return rows.row_lengths()
    return np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))


def targets_per_row(labels: Sequence[Sequence[int]]) -> np.ndarray:
    """Per row of labels, the positions trained on (the loss items of SFT)."""
    if isinstance(labels, (TokenRows, GatheredRows)):
        return labels.targets_per_row()
    return np.fromiter((len(row) - 1 - row[1:].count(IGNORE_INDEX) if row else 0 for row in labels),
                       dtype=np.int64, count=len(labels))


def map_npz(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of an uncompressed .npz, memory-mapped read-only (ValueError if one cannot be)."""
    arrays = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for name in names:
            info = archive.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{name} is compressed")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(member)
                npy_header = member.tell()
            raw.seek(info.header_offset)
            local = raw.read(_LOCAL_HEADER)
            if local[:4] != b"PK\x03\x04":
                raise ValueError("not a zip local header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = info.header_offset + _LOCAL_HEADER + name_length + extra_length + npy_header
            if dtype.hasobject or fortran_order:
                raise ValueError(f"{name}: not a plain array")
            if int(np.prod(shape)) == 0:
                arrays[name] = np.zeros(shape, dtype=dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape)
    return arrays


class TokenCacheWriter:
    """Writes the .npz cache a chunk of rows at a time: token rows go straight to temp files on disk, only their
    lengths stay in memory, so tokenising a large data set never holds all of it as Python lists. finish()
    assembles the same .npz np.savez would write (uncompressed members, int32 rows, int64 offsets) and renames
    it into place; abort() leaves nothing behind."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{cache_file.stem}-", dir=cache_file.parent))
        self.streams: dict[str, Any] = {}
        self.lengths: dict[str, list[np.ndarray]] = {}
        self.scalars: dict[str, list[float]] = {}

    def add(self, columns: dict[str, list]) -> None:
        for name, rows in columns.items():
            if name in SCALAR_COLUMNS:
                self.scalars.setdefault(name, []).extend(rows)
                continue
            if name not in self.streams:
                self.streams[name] = open(self.folder / f"{name}.raw", "wb")  # noqa: SIM115 - closed in finish/abort
                self.lengths[name] = []
            np.fromiter((token for row in rows for token in row), dtype=np.int32).tofile(self.streams[name])
            self.lengths[name].append(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))

    def finish(self, stats_json: str) -> None:
        temp = self.folder / "cache.npz"
        try:
            with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                _write_array(archive, "stats", np.array(stats_json))
                for name, stream in self.streams.items():
                    stream.close()
                    raw = self.folder / f"{name}.raw"
                    with archive.open(f"{name}.flat.npy", "w", force_zip64=True) as member, raw.open("rb") as source:
                        header = {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                  "shape": (raw.stat().st_size // 4,)}
                        np.lib.format.write_array_header_1_0(member, header)
                        shutil.copyfileobj(source, member, 1 << 22)
                    raw.unlink()
                    lengths = np.concatenate(self.lengths[name]) if self.lengths[name] else np.zeros(0, np.int64)
                    _write_array(archive, f"{name}.offsets", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
                for name, values in self.scalars.items():
                    _write_array(archive, name, np.asarray(values, dtype=np.float64))
            os.replace(temp, self.cache_file)
        finally:
            self.abort()

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)
