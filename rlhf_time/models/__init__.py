"""Model loading, families (Qwen, Llama), tuning strategies and the embedded tiny default."""

from rlhf_time.models.families import FAMILIES, ModelFamily, decoder_layers
from rlhf_time.models.loading import ensure_chat_template, load_causal_lm, load_tokenizer, model_family, resolve_model_path
from rlhf_time.models.tuning import apply_tuning, count_parameters

__all__ = [
    "FAMILIES", "ModelFamily", "decoder_layers", "ensure_chat_template", "load_causal_lm", "load_tokenizer",
    "model_family", "resolve_model_path", "apply_tuning", "count_parameters",
]
