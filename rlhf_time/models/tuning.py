"""Training strategies: full fine-tuning, LoRA (peft) and frozen decoder layers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models.families import ModelFamily, decoder_layers
from rlhf_time.models.peft_import import use_bitsandbytes_in_peft
from rlhf_time.models.precision import float32_inputs_for_trained_modules, low_precision_frozen_layers, trainable_to_float32

log = logging.getLogger(__name__)


def apply_tuning(model: nn.Module, config: TrainingConfig, family: ModelFamily, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Return the model ready to train with the configured strategy (LoRA wraps it in a PeftModel)."""
    base_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if config.use_lora:
        if config.quantization != "none":
            from peft import prepare_model_for_kbit_training

            # Norms and other small non-quantised weights to float32, inputs made to require grad; activation
            # checkpointing is switched on below (non-reentrant), not here.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = _wrap_lora(model, config, family, task_type)
    elif config.freeze_layers:
        _freeze_layers(model, config.freeze_layers)
    if base_dtype != torch.float32 and (config.use_lora or config.freeze_layers):
        # A low-precision frozen base; what trains is float32 (peft already makes LoRA weights float32).
        trainable_to_float32(model)
        if config.freeze_layers:
            low_precision_frozen_layers(decoder_layers(model), base_dtype)
        else:
            float32_inputs_for_trained_modules(model)
    if config.use_gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it also works when the
        # embeddings are frozen (LoRA, frozen first layers).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s total (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def _wrap_lora(model: nn.Module, config: TrainingConfig, family: ModelFamily, task_type: str) -> nn.Module:
    use_bitsandbytes_in_peft(wanted=config.quantization != "none")
    from peft import LoraConfig, get_peft_model

    targets = list(config.lora_target_modules or family.lora_target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise RlhfTimeError(
            f"lora_target_modules: {missing} not found in the model; linear modules here include "
            f"{sorted(n for n in present if n.endswith('proj'))}"
        )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def _freeze_layers(model: nn.Module, indices: list[int]) -> None:
    layers = decoder_layers(model)
    bad = [i for i in indices if i >= len(layers)]
    if bad:
        raise RlhfTimeError(f"freeze_layers: {bad} out of range; the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    for index in indices:
        layers[index].requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total
