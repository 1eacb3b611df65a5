"""Merge a LoRA adapter into its base model: a standalone Hugging Face folder that needs no peft to load.

The merged folder keeps the adapter folder's tokenizer, whose chat template is the layout used in training
(custom prompt/response templates are saved as a Jinja chat template, rlhf_time/templates.py), and is written
in the base model's dtype unless another is asked for.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Optional

import torch

from rlhf_time.atomic import atomic_directory
from rlhf_time.errors import RlhfTimeError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(adapter_dir: str, output_dir: str, dtype: Optional[str] = None,
                  trust_remote_code: bool = False) -> Path:
    """Load base + adapter with peft in float32, merge the LoRA deltas, cast to `dtype`, save atomically.

    The base may be a local folder or a hub id (from the local cache, or downloaded). dtype: bfloat16, float16
    or float32; None keeps the base model's own dtype (its config.json). `output_dir` must be new or an empty
    folder: nothing already there is ever removed. trust_remote_code: the caller's own choice; a value saved in
    the adapter folder is never taken over.
    """
    from rlhf_time.models.peft_import import use_bitsandbytes_in_peft

    use_bitsandbytes_in_peft(wanted=False)  # before peft is imported: no bitsandbytes noise for a merge
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_time.models.loading import _from_pretrained

    adapter = Path(adapter_dir)
    config_path = adapter / "adapter_config.json"
    if not adapter.exists():
        raise RlhfTimeError(f"{adapter}: adapter folder not found")
    if not config_path.is_file():
        raise RlhfTimeError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    target = Path(output_dir)
    refuse_export_target(target, adapter)
    if dtype is not None and dtype not in DTYPES:
        raise RlhfTimeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base_path = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_path:
        raise RlhfTimeError(f"{config_path}: no base_model_name_or_path; cannot tell which model to merge into")
    trust = trust_remote_code
    # A hub id resolves to the cached snapshot, or is downloaded (a clear error when offline and not cached).
    base_config = _from_pretrained(AutoConfig, base_path, trust)
    target_dtype = DTYPES[dtype] if dtype else _config_dtype(base_config)
    # Merge in float32 (W + scale * B @ A without rounding twice), then cast once.
    base = _from_pretrained(AutoModelForCausalLM, base_path, trust, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().to(target_dtype)
    try:
        with atomic_directory(target, replace=False) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_path
            _from_pretrained(AutoTokenizer, tokenizer_source, trust).save_pretrained(staging)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):  # filled while we merged
            raise RlhfTimeError(f"export target {target}: something appeared there during the export; nothing "
                                f"was written") from None
        raise
    return target


def refuse_export_target(target: Path, adapter: Path) -> None:
    """Refuse, before any model is loaded, a target whose writing could touch what is already there."""
    if target.is_symlink():
        raise RlhfTimeError(f"export target {target}: is a symbolic link; give a new folder")
    if target.exists() and not target.is_dir():
        raise RlhfTimeError(f"export target {target}: is a file; give a new or empty folder")
    resolved, source = target.resolve(), adapter.resolve()
    if resolved == source:
        raise RlhfTimeError(f"export target {target}: is the adapter folder itself; give a new folder")
    if source in resolved.parents:
        raise RlhfTimeError(f"export target {target}: is inside the adapter folder {adapter}; give a folder elsewhere")
    if resolved in source.parents:
        raise RlhfTimeError(f"export target {target}: contains the adapter folder {adapter}; give a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise RlhfTimeError(f"export target {target}: exists and is not empty; give a new or empty folder")
    if resolved == Path(os.getcwd()).resolve():
        raise RlhfTimeError(f"export target {target}: is the working directory; give a new folder")


def _config_dtype(config) -> torch.dtype:
    """The dtype a model's config.json declares (float32 when it declares none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32

