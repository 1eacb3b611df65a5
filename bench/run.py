"""SFT throughput and memory: rlhf_time against TRL and a plain PyTorch loop, on the same data and model.

    python bench/run.py [--model tiny|small] [--steps 30] [--batch-size 8] [--out bench/out]

Every variant runs in its own subprocess (so peak RSS is its own), one after the other, on:
  - the same synthetic set: prompts of 10-250 and responses of 5-120 random words of the tiny tokenizer
    (fixed seed), exactly steps x batch_size examples, so one epoch = the run: every variant sees every example
    once, in the same number of optimiser steps;
  - the same Qwen3 model built from a config (tiny ~1.6M or small ~25M parameters), saved once to a temp folder;
  - the same optimisation: AdamW, lr 1e-3, linear decay, no warmup, no weight decay, clip 1.0, float32;
  - the same loss: cross-entropy on response tokens (+ eos) only, summed and divided by the step's target tokens.
Reported: real (non-padding) tokens/sec of the training loop, its ratio to TRL, peak RSS, the final loss
(held-out set, same function for every variant), the last-10-step train loss, and MFU: the run's model FLOPs
(rlhf_time's ThroughputMeter count: 3 x forward, the LM head on trained positions, causal attention by real
length) / s / the CPU peak (rlhf_time.runtime.throughput.cpu_peak_flops). Writes results.md, results.json and
throughput.png.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from toolkit import (ROOT, SEED, ChildFailed, finish_child, markdown_table, run_child, save_qwen3,
                     training_config, write_results)

VARIANTS = {
    "rlhf_time": "rlhf_time default (length-grouped batches)",
    "rlhf_time_packing": "rlhf_time packing=true",
    "trl": "TRL SFTTrainer (padded batches)",
    "trl_padding_free": "TRL SFTTrainer padding_free=true",
    "torch": "plain PyTorch loop, padded batches",
}
MODELS = {"tiny": "128x6", "small": "512x8"}  # toolkit.QWEN3_SHAPES, at the tiny tokenizer's vocabulary, tied head
LEARNING_RATE, EVAL_EXAMPLES = 1e-3, 64


# ------------------------------------------------------------------------------------------- set-up
def make_records(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt 10-250 and response 5-120 words, each word one space-prefixed token of the tiny tokenizer."""
    from rlhf_time.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    words = sorted(tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()
                   if t.startswith("Ġ") and t[1:].isalpha())
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices(words, k=rng.randint(10, 250))),
             "response": "".join(rng.choices(words, k=rng.randint(5, 120)))} for _ in range(count)]


def build_model(size: str, folder: Path) -> int:
    from rlhf_time.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    return save_qwen3(folder, MODELS[size], tokenizer, vocab_size=len(tokenizer), max_position_embeddings=1024,
                      tie_word_embeddings=True)


def rlhf_time_config(work: Path, args, **overrides):
    return training_config(
        work, experiment_name=overrides.pop("name"), train_file=str(work / "train.jsonl"), prompt_template="{prompt}",
        response_template="{response}", max_seq_length=1024, batch_size=args.batch_size, max_steps=args.steps,
        num_train_epochs=1, learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps_ratio=0.0,
        weight_decay=0.0, max_grad_norm=1.0, **overrides)


# ------------------------------------------------------------------------------------------ variants
def run_rlhf_time(work: Path, args, packing: bool):
    from rlhf_time.stages.sft import SFTrainer

    trainer = SFTrainer(rlhf_time_config(work, args, name=f"rt_{packing}", packing=packing))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    return trainer.model, seconds, losses


def run_trl(work: Path, args, padding_free: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in records])
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    # TRL's device defaults, except precision and activation checkpointing, which are set as rlhf_time's
    # defaults (float32, no checkpointing) so both do the same arithmetic (SFTConfig defaults: bf16=True,
    # gradient_checkpointing=True).
    config = SFTConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
        max_length=None if padding_free else 1024, padding_free=padding_free, seed=SEED, data_seed=SEED, disable_tqdm=True, use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    check_trl_examples(work, trainer.train_dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return model, seconds, losses


def check_trl_examples(work: Path, processed) -> None:
    """Equal work: TRL's tokens and completion-only targets must be rlhf_time's, example for example."""
    reference = json.loads((work / "examples.json").read_text())
    ours = {tuple(e["input_ids"]): e["labels"] for e in reference}
    # TRL builds labels from its completion_mask (completion-only loss is the default for prompt-completion data).
    same = sum(ours.get(tuple(row["input_ids"])) == list(row["labels"]) for row in processed)
    (work / "trl_check.json").write_text(json.dumps({"identical_examples": same, "examples": len(reference)}))


def run_torch(work: Path, args):
    """The plain loop: shuffled padded batches, response-token cross-entropy / target tokens, AdamW, clip."""
    from transformers import AutoModelForCausalLM

    examples = json.loads((work / "examples.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED)).tolist()
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = pad([examples[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
        loss = loss / (labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, time.perf_counter() - start, losses


def pad(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    fill = lambda key, value: torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])  # noqa: E731
    ones = [{"m": [1] * len(e["input_ids"])} for e in examples]
    return {"input_ids": fill("input_ids", 0), "labels": fill("labels", -100),
            "attention_mask": torch.tensor([o["m"] + [0] * (width - len(o["m"])) for o in ones])}


@torch.no_grad()
def held_out_loss(model, work: Path) -> float:
    """Token-weighted response cross-entropy on the held-out examples (the same function for every variant)."""
    model.eval()
    examples = json.loads((work / "eval_examples.json").read_text())
    total, count = 0.0, 0
    for start in range(0, len(examples), 16):
        batch = pad(examples[start : start + 16])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                         reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def run_variant(name: str, work: Path, args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if name.startswith("rlhf_time"):
        model, seconds, losses = run_rlhf_time(work, args, packing=name.endswith("packing"))
    elif name.startswith("trl"):
        model, seconds, losses = run_trl(work, args, padding_free=name.endswith("padding_free"))
    else:
        model, seconds, losses = run_torch(work, args)
    finish_child({"seconds": seconds, "losses": losses, "final_loss": held_out_loss(model, work)}, work / f"{name}.json")


# ------------------------------------------------------------------------------------------- driver
def prepare(work: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf_time.data import PaddingCollator, load_sft_dataset
    from rlhf_time.models.tiny import load_tiny_tokenizer
    from rlhf_time.runtime.throughput import ThroughputMeter, device_peak_flops

    count = args.steps * args.batch_size
    records = make_records(count + EVAL_EXAMPLES, seed=SEED)
    for name, rows in (("train", records[:count]), ("eval", records[count:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parameters = build_model(args.model, work / "model")
    config = rlhf_time_config(work, args, name="prepare")
    tokenizer = load_tiny_tokenizer()
    for name, file in (("examples", "train"), ("eval_examples", "eval")):
        dataset = load_sft_dataset(str(work / f"{file}.jsonl"), tokenizer, config, cache_dir=str(work / "prep"))
        rows = [{"input_ids": list(dataset[i]["input_ids"]), "labels": list(dataset[i]["labels"])}
                for i in range(len(dataset))]
        (work / f"{name}.json").write_text(json.dumps(rows))
    examples = json.loads((work / "examples.json").read_text())
    torch.set_num_threads(args.threads)
    # every variant trains on these examples once: the same model FLOPs, counted as rlhf_time's meter counts them
    meter = ThroughputMeter(AutoModelForCausalLM.from_pretrained(work / "model"), torch.device("cpu"))
    return {"parameters": parameters, "tokens": sum(len(e["input_ids"]) for e in examples),
            "target_tokens": sum(sum(t != -100 for t in e["labels"][1:]) for e in examples),
            "model_flops": 3 * meter.forward_flops(PaddingCollator(pad_token_id=tokenizer.pad_token_id)(examples)),
            "peak_flops": device_peak_flops(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args.variant, Path(args.work), args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shared = prepare(work, args)
        results = {}
        for name in args.variants.split(","):
            command = [sys.executable, __file__, "--variant", name, "--work", str(work), "--model", args.model,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            try:
                results[name] = run_child(command, work / f"{name}.json")
            except ChildFailed as error:
                print(f"{name} failed:\n{error}", file=sys.stderr)
        check = json.loads((work / "trl_check.json").read_text()) if (work / "trl_check.json").exists() else None
    report(results, shared, check, args, out)


def report(results: dict, shared: dict, check, args, out: Path) -> None:
    trl = results.get("trl", {}).get("seconds")
    lines = [f"model {args.model} ({shared['parameters'] / 1e6:.1f}M parameters), {args.steps} steps x batch "
             f"{args.batch_size}, {shared['tokens']:,} tokens ({shared['target_tokens']:,} trained on), "
             f"{args.threads} threads, CPU peak {shared['peak_flops'] / 1e9:.0f} GFLOP/s (one-thread matmul x threads)",
             ""]
    rows = []
    for name, r in results.items():
        r["tokens_per_sec"] = shared["tokens"] / r["seconds"]
        r["ratio_to_trl"] = trl / r["seconds"] if trl else float("nan")
        r["mfu"] = shared["model_flops"] / r["seconds"] / shared["peak_flops"]
        r["last10_train_loss"] = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        rows.append([VARIANTS[name], f"{r['tokens_per_sec']:,.0f}", f"{r['ratio_to_trl']:.2f}x", f"{r['peak_memory_gb']:.2f}",
                     f"{r['final_loss']:.4f}", f"{r['last10_train_loss']:.4f}", f"{r['mfu']:.1%}"])
    lines += markdown_table(["variant", "tokens/sec", "vs TRL", "peak RSS (GB)", "final loss", "last-10 train loss",
                             "MFU"], rows)
    if check:
        lines.append(f"\nTRL examples identical to rlhf_time's (tokens and trained positions): "
                     f"{check['identical_examples']}/{check['examples']}")
    losses = [r["final_loss"] for r in results.values()]
    if losses:
        spread = (max(losses) - min(losses)) / min(losses)
        lines.append(f"final losses within {spread * 100:.2f}% of each other")
    write_results(out, "results", "\n".join(lines), {"args": vars(args), "shared": shared, "check": check,
                                                     "results": results})
    chart(results, out / "throughput.png", args)


def chart(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [results[n]["tokens_per_sec"] for n in names], color="tab:blue")
    left.set_xlabel("tokens / second (higher is better)")
    right.barh(names, [results[n]["peak_memory_gb"] for n in names], color="tab:orange")
    right.set_xlabel("peak RSS, GB (lower is better)")
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle(f"SFT, {args.model} Qwen3, {args.steps} steps x batch {args.batch_size}, CPU ({args.threads} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
