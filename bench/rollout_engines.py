"""Rollout speed of the two sampling engines (rollout.engine): kv_cache (rlhf_time's own) and transformers_paged
(transformers' continuous batching, log-probs recomputed by one forward), same model, prompts and settings.

    python bench/rollout_engines.py [--groups 8,16] [--lengths 64,256] [--prompts 4] [--repeats 2] [--threads 2]

Set-up: the embedded tiny model (Qwen3 architecture, ~1.7M parameters, 587-token vocabulary) as built, untrained,
so completions rarely stop before max_new_tokens and every variant samples about prompts x G x length tokens;
float32 on CPU. Prompts: the first --prompts of examples/data/grpo_train.jsonl in the chat template. Sampling:
temperature 0.7, top_k 0, top_p 1, stop at the end-of-turn token, a fixed generator seed per repeat.

Every variant runs in this one process, the engines alternating within each (G, length) so both see the same
machine load; each engine samples once untimed first. Reported: sampled tokens / wall seconds of `engine.sample`
(the log-probs and entropies included: both engines return them), the median over --repeats, and the 1-minute
load average before each variant (the machine is shared). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENGINES = ("kv_cache", "transformers_paged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="8,16", help="completions per prompt (G), comma-separated")
    parser.add_argument("--lengths", default="64,256", help="max_new_tokens values, comma-separated")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from rlhf_time.experience.engines import create_sampling_engine
    from rlhf_time.experience.sampler import SamplingParams
    from rlhf_time.models.tiny import load_tiny_tokenizer, tiny_model_path

    tokenizer = load_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).train()
    records = [json.loads(line) for line in (ROOT / "examples/data/grpo_train.jsonl").read_text().splitlines()]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True)["input_ids"])
               for r in records[: args.prompts]]
    engines = {name: create_sampling_engine(name, model) for name in ENGINES}

    def params(length: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=length, pad_token_id=tokenizer.pad_token_id,
                              stop_token_ids=(tokenizer.convert_tokens_to_ids("<|im_end|>"),), temperature=0.7)

    for engine in engines.values():  # untimed: first-call costs (allocator, lazy imports) paid once per engine
        engine.sample(prompts[:1], params(4), num_samples=2, generator=torch.Generator().manual_seed(0))

    rows = []
    for group in map(int, args.groups.split(",")):
        for length in map(int, args.lengths.split(",")):
            for name, engine in engines.items():
                load, rates, tokens = os.getloadavg()[0], [], []
                for repeat in range(args.repeats):
                    start = time.perf_counter()
                    rollout = engine.sample(prompts, params(length), num_samples=group,
                                            generator=torch.Generator().manual_seed(repeat))
                    seconds = time.perf_counter() - start
                    tokens.append(int(rollout.completion_mask.sum()))
                    rates.append(tokens[-1] / seconds)
                rows.append({"G": group, "length": length, "engine": name, "tokens": statistics.median(tokens),
                             "tokens_per_s": statistics.median(rates), "load_average": load})
                print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.prompts} prompts, float32, {args.threads} threads, median of {args.repeats}\n")
    print("| G | max_new_tokens | engine | tokens sampled | tokens/s | paged / kv_cache | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["G"] == row["G"] and r["length"] == row["length"] and r["engine"] == ENGINES[0])
        print(f"| {row['G']} | {row['length']} | {row['engine']} | {row['tokens']:.0f} | {row['tokens_per_s']:.0f} | "
              f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x | {row['load_average']:.1f} |")


if __name__ == "__main__":
    main()
