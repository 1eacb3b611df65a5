"""Models from ModelScope (modelscope.cn): a model id resolves to a local snapshot, downloaded once with progress.

The snapshot lives in ModelScope's cache (MODELSCOPE_CACHE, default ~/.cache/modelscope/hub); a model already
there (current `models/ORG--NAME/snapshots/...` layout or the older `ORG/NAME` one, with '.' written '___') is
used without contacting the server.
"""

from __future__ import annotations

import logging

from rlhf_time.errors import RlhfTimeError

log = logging.getLogger(__name__)


def modelscope_snapshot(model_id: str) -> str:
    """The local folder of `model_id` from ModelScope: the cached snapshot, else downloaded (progress bars on)."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise RlhfTimeError("model_source modelscope needs the modelscope package: pip install 'rlhf_time[modelscope]'") from None
    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached (the exception type differs across modelscope versions)
        pass
    log.info("downloading %s from ModelScope", model_id)
    try:
        # A bytes progress bar per file (by default ModelScope only counts finished files).
        from modelscope.hub.callback import TqdmCallback

        progress = {"progress_callbacks": [TqdmCallback]}
    except ImportError:  # older modelscope: its own default bars
        progress = {}
    try:
        return snapshot_download(model_id, **progress)
    except Exception as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RlhfTimeError(f"model_name {model_id!r}: not in the ModelScope cache and the download failed "
                            f"({type(error).__name__}: {message}); download it first or pass a local folder") from None
