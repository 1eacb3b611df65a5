"""Load dtype and quantisation of the model, and float32 for whatever trains.

Memory of the weights alone, N parameters: float32 4N bytes, bfloat16/float16 2N, 8-bit ~1N, 4-bit NF4 with
double quantisation ~0.52N (4 bits + one fp8 scale per 64 weights + one fp32 scale per 256 of those).
A frozen base needs no float32 master copy: LoRA and frozen-layer training load it in bfloat16 where the
device has bf16 (`model_dtype: auto`), and only the trained weights (adapters, unfrozen layers, a new reward
head) are kept in float32, so AdamW updates are not rounded away.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def target_device(config: TrainingConfig) -> torch.device:
    """The device this process trains on (torchrun: cuda:LOCAL_RANK), as the loop will choose it."""
    if config.device:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def freezes_base(config: TrainingConfig) -> bool:
    return bool(config.use_lora or config.freeze_layers or config.quantization != "none")


def load_dtype(config: TrainingConfig, device: Optional[torch.device] = None) -> torch.dtype:
    """model_dtype, or for auto: bfloat16 for a frozen base on a CUDA device with bf16, else float32.

    CPUs stay float32 under auto: most run bf16 matmuls slower than fp32, and full fine-tuning keeps float32
    master weights (ask for bfloat16 explicitly to train every weight in bf16).
    """
    if config.model_dtype != "auto":
        return DTYPES[config.model_dtype]
    device = device or target_device(config)
    if freezes_base(config) and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(config: TrainingConfig, device: Optional[torch.device] = None):
    """transformers' BitsAndBytesConfig for quantization 4bit (QLoRA: NF4, double quantisation) or 8bit; else None."""
    if config.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RlhfTimeError("quantization needs bitsandbytes: pip install 'rlhf_time[qlora]' (or bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    device = device or target_device(config)
    compute = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def trainable_to_float32(model: nn.Module) -> int:
    """Cast every trainable floating parameter to float32 in place; returns how many were cast."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def low_precision_frozen_layers(layers: list[nn.Module], dtype: torch.dtype) -> None:
    """Frozen decoder layers (freeze_layers) held in `dtype` between float32 trainable parts: their inputs are cast
    to `dtype` and their outputs back to float32, so every Linear sees one dtype (no autocast needed)."""
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            continue
        layer.to(dtype)
        layer.register_forward_pre_hook(lambda _m, args, kwargs, d=dtype: (_cast(args, d), _cast(kwargs, d)),
                                        with_kwargs=True)
        layer.register_forward_hook(lambda _m, _args, output: _cast(output, torch.float32))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def float32_inputs_for_trained_modules(model: nn.Module) -> None:
    """A fully trained module of a LoRA model outside the adapters (peft's modules_to_save, e.g. a reward head
    `score`) is float32 while the base hands it bf16 activations: cast its inputs to float32."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if "lora_" in name or not own or not all(p.requires_grad and p.dtype == torch.float32 for p in own):
            continue
        module.register_forward_pre_hook(lambda _m, args: _cast(args, torch.float32))
