"""Weight memory of one model under each model_dtype / quantization setting (CPU, measured, not estimated).

Builds a Qwen3-architecture model from a config (no download; default ~0.6B-shaped but fewer layers so it fits
a small machine), saves it, then loads it the way the trainer does (load_causal_lm + apply_tuning) for each
setting and reports the bytes of its parameters and buffers (model.get_memory_footprint()), split into frozen
and trained. Usage: python bench/model_memory.py [--layers 4] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch

from rlhf_time import TrainingConfig
from rlhf_time.models import apply_tuning, load_causal_lm, model_family

SETTINGS = [
    ("full fine-tuning, float32", dict()),
    ("LoRA, float32 base", dict(use_lora=True)),
    ("LoRA, bfloat16 base", dict(use_lora=True, model_dtype="bfloat16")),
    ("QLoRA 8bit", dict(use_lora=True, quantization="8bit")),
    ("QLoRA 4bit (NF4, double quant)", dict(use_lora=True, quantization="4bit")),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from rlhf_time.models.tiny import TOKENIZER_DIR

    config = Qwen3Config(vocab_size=32000, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as folder:
        model = Qwen3ForCausalLM(config)
        total = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
        del model
        print(f"model: {total / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}, vocab 32000)")
        print("| setting | weights (MB) | of which trained (MB) | bytes/parameter |")
        print("|---|---|---|---|")
        for name, settings in SETTINGS:
            cfg = TrainingConfig(model_name=folder, model_type="qwen", lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **settings)
            model = apply_tuning(load_causal_lm(cfg), cfg, model_family(cfg))
            footprint = model.get_memory_footprint()
            trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            print(f"| {name} | {footprint / 2**20:.0f} | {trained / 2**20:.1f} | {footprint / total:.2f} |")
            del model
            gc.collect()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
