"""Merge a LoRA adapter into its base model: a standalone Hugging Face folder that needs no peft to load.

The merged folder keeps the adapter folder's tokenizer, whose chat template is the layout used in training
(custom prompt/response templates are saved as a Jinja chat template, rlhf_time/templates.py), and is written
in the base model's dtype unless another is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from rlhf_time.atomic import atomic_directory
from rlhf_time.errors import RlhfTimeError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merge_adapter(adapter_dir: str, output_dir: str, dtype: Optional[str] = None) -> Path:
    """Load base + adapter with peft in float32, merge the LoRA deltas, cast to `dtype`, save atomically.

    The base may be a local folder or a hub id (from the local cache, or downloaded). dtype: bfloat16, float16
    or float32; None keeps the base model's own dtype (its config.json).
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
    if dtype is not None and dtype not in DTYPES:
        raise RlhfTimeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base_path = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_path:
        raise RlhfTimeError(f"{config_path}: no base_model_name_or_path; cannot tell which model to merge into")
    trust = _trusts_remote_code(adapter)
    # A hub id resolves to the cached snapshot, or is downloaded (a clear error when offline and not cached).
    base_config = _from_pretrained(AutoConfig, base_path, trust)
    target_dtype = DTYPES[dtype] if dtype else _config_dtype(base_config)
    # Merge in float32 (W + scale * B @ A without rounding twice), then cast once.
    base = _from_pretrained(AutoModelForCausalLM, base_path, trust, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().to(target_dtype)
    target = Path(output_dir)
    with atomic_directory(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_path
        _from_pretrained(AutoTokenizer, tokenizer_source, trust).save_pretrained(staging)
    return target


def _config_dtype(config) -> torch.dtype:
    """The dtype a model's config.json declares (float32 when it declares none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _trusts_remote_code(adapter: Path) -> bool:
    """Whether the run that trained the adapter allowed remote code (rlhf_time_config.yaml), else False."""
    saved = adapter / "rlhf_time_config.yaml"
    if not saved.is_file():
        return False
    import yaml

    return bool((yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("trust_remote_code", False))
