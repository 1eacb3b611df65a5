"""Model families: what differs between Qwen and Llama for training (LoRA targets, end-of-turn, chat template)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rlhf_time.errors import RlhfTimeError

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_model_types: tuple[str, ...]
    lora_target_modules: tuple[str, ...]
    end_of_turn_token: str
    chat_template: str


FAMILIES = {
    "Qwen": ModelFamily("Qwen", ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"), ALL_LINEAR, "<|im_end|>", QWEN_CHAT_TEMPLATE),
    "Llama": ModelFamily("Llama", ("llama",), ALL_LINEAR, "<|eot_id|>", LLAMA3_CHAT_TEMPLATE),
}


def resolve_family(configured: str | None, user_set_it: bool, hf_model_type: str) -> ModelFamily:
    """The family the user named, else the one the model's config says, else Qwen's conventions."""
    inferred = next((f for f in FAMILIES.values() if hf_model_type in f.hf_model_types), None)
    if user_set_it and configured:
        return FAMILIES[configured]
    return inferred or FAMILIES[configured or "Qwen"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (plain, peft-wrapped or sequence-classification)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix, base)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RlhfTimeError(f"cannot find the decoder layers of {type(base).__name__} (expected .{base.base_model_prefix}.layers)")
    return layers
