"""The one entry point that checks a data set before any model is loaded, whatever its kind and however it is read:
prompt-only records (on-policy stages), a stream (checked as it is read: only its first record here), or records
read whole (every record, remembered per content and settings). It sits above dataset.py and streaming.py, so
neither of them needs the other's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rlhf_time.data.dataset import check_data_kind, validate_records
from rlhf_time.data.prompts import validate_prompt_file
from rlhf_time.data.sources import as_spec
from rlhf_time.data.streaming import check_stream_sources


def validate_data_file(path, config, kind: str = "conversation", *, cache_dir: Optional[str | Path] = None) -> None:
    """Check a data set so bad data fails before a model is loaded.

    path: a file / source, a list of them, or a DataSpec.
    kind: the data kind the stage trains on (its trainer's `data_kind`): "conversation", "preference" or "prompt".
    With cache_dir, a data set read whole that passed once with the same content and data settings is not read
    again (a marker in cache_dir/validated).
    """
    check_data_kind(kind)
    if kind == "prompt":  # on-policy stages: prompt-only records (rlhf_time.data.prompts)
        validate_prompt_file(path, config)
        return
    spec = as_spec(path)
    if getattr(config, "streaming", False) and spec.role == "train":  # a stream is checked as it is read
        check_stream_sources(spec, config, kind)
        return
    validate_records(spec, config, kind, cache_dir=cache_dir)
