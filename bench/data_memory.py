"""Memory of a tokenised data set held by the trainer: RSS after loading a large synthetic JSONL, first run
(tokenise + write the cache) and second run (cache hit), each in a fresh process.

    python bench/data_memory.py --records 200000

Prints one JSON line per run: records, examples, tokens, the process's peak RSS and its RSS after loading
(with the data set still referenced, after gc), in MiB, and the RSS growth per token.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from toolkit import peak_memory_gb

from rlhf_time.runtime.throughput import process_memory_bytes  # noqa: E402  (toolkit put the repository on the path)


def _rss_mib() -> float:
    resident = process_memory_bytes("VmRSS")
    return float("nan") if resident is None else resident / 2**20


def _write_records(path: Path, count: int) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "数据", "模型", "训练", "epsilon", "zeta", "eta", "theta", "iota"]
    with path.open("w", encoding="utf-8") as stream:
        for _ in range(count):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))
            response = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
            stream.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n")


def _load(path: str, cache: str) -> None:
    from rlhf_time import TrainingConfig
    from rlhf_time.data import load_sft_dataset
    from rlhf_time.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = TrainingConfig(model_name="tiny", max_seq_length=1024, disable_progress_bar=True, num_proc=1)
    gc.collect()
    before = _rss_mib()
    dataset = load_sft_dataset(path, tokenizer, config, cache_dir=cache)
    gc.collect()
    after = _rss_mib()
    example = dataset[len(dataset) // 2]  # the data set is usable (and still referenced)
    print(json.dumps({"examples": len(dataset), "tokens": dataset.stats.total_tokens,
                      "rss_before_mib": round(before), "rss_after_mib": round(after),
                      "peak_rss_mib": round(peak_memory_gb() * 1024),
                      "held_bytes_per_token": round((after - before) * 2**20 / dataset.stats.total_tokens, 1),
                      "example_tokens": len(example["input_ids"])}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--load", nargs=2, help=argparse.SUPPRESS)  # internal: one measured load
    args = parser.parse_args()
    if args.load:
        return _load(*args.load)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        _write_records(path, args.records)
        print(f"{args.records} records, {path.stat().st_size / 2**20:.0f} MiB of JSONL")
        for run in ("first run (tokenise + cache)", "second run (cache hit)"):
            result = subprocess.run([sys.executable, __file__, "--load", str(path), str(Path(folder) / "cache")],
                                    capture_output=True, text=True, check=True)
            print(run, result.stdout.strip())


if __name__ == "__main__":
    main()
