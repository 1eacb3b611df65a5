"""Download progress for models and data sets fetched from the Hugging Face Hub (or a mirror via HF_ENDPOINT)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def download_progress():
    """huggingface_hub's progress bars on for the duration (the trainer quiets transformers, which switches them
    off process-wide): a 16 GB first download must show its progress. HF_HUB_DISABLE_PROGRESS_BARS still wins."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        enable_progress_bars()
    try:
        yield
    finally:
        if was_disabled:
            disable_progress_bars()
