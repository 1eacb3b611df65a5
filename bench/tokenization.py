"""Tokenisation speed: rlhf_time's data pipeline vs `datasets.map(batched=True)` on the same records.

Both produce input_ids + response-only labels with the tokenizer's chat template, from a JSONL file of N
prompt/response records (Chinese and English). Run: `python bench/tokenization.py [--records 20000]`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from rlhf_time import TrainingConfig
from rlhf_time.data import load_sft_dataset
from rlhf_time.models.tiny import load_tiny_tokenizer

WORDS = "the model learns to answer 问题 回答 数据 训练 你好 quickly and well 模型 微调".split()


def make_file(path: Path, count: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
            handle.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


def datasets_map(path: Path, tokenizer) -> float:
    """The usual recipe: render prompt and full text with the chat template, tokenise both in batches."""
    from datasets import load_dataset

    def encode(batch):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in batch["prompt"]]
        fulls = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                               tokenize=False) for p, r in zip(batch["prompt"], batch["response"])]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
        labels = [[-100] * len(p) + f[len(p):] for p, f in zip(prompt_ids, full_ids)]
        return {"input_ids": full_ids, "labels": labels}

    start = time.perf_counter()
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp())
    dataset.map(encode, batched=True, batch_size=1000, remove_columns=dataset.column_names, load_from_cache_file=False)
    return time.perf_counter() - start


def ours(path: Path, tokenizer) -> float:
    start = time.perf_counter()
    load_sft_dataset(path, tokenizer, TrainingConfig(max_seq_length=4096), cache_dir=None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    tokenizer = load_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        make_file(path, args.records)
        peer, mine = datasets_map(path, tokenizer), ours(path, tokenizer)
    print(f"{args.records} records | datasets.map(batched): {peer:.2f} s | rlhf_time: {mine:.2f} s | "
          f"ratio {peer / mine:.2f}x")


if __name__ == "__main__":
    main()
