"""Merge a LoRA adapter into its base model: a standalone Hugging Face folder that needs no peft to load."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_time.atomic import atomic_directory
from rlhf_time.errors import RlhfTimeError


def merge_adapter(adapter_dir: str, output_dir: str) -> Path:
    """Load base + adapter with peft, merge the LoRA deltas into the base weights, save atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise RlhfTimeError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    base_path = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_path or not Path(base_path).exists():
        raise RlhfTimeError(f"{config_path}: base model {base_path!r} not found locally; it is needed to merge")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    target = Path(output_dir)
    with atomic_directory(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)
    return target
