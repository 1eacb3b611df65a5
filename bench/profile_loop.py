"""Where SFTrainer.train() spends its time: torch.profiler over a short run, grouped by kind of work.

    python bench/profile_loop.py [--model tiny|small] [--steps 8] [--batch-size 8]
    python bench/profile_loop.py --real-vocab [--stage sft|dpo] [--steps 3] [--batch-size 4]   # Qwen3 vocabulary, 256x4

Same synthetic data and model builder as bench/run.py (rlhf_time defaults: length-grouped batches, chunked loss).
Every aten operator's self time is put in one group (matmuls, attention, elementwise/normalisation, optimizer,
loss, other); "outside torch operators" is the wall time of train() minus all operator time: Python, the data
pipeline, logging. Prints a markdown table and the 15 most expensive operators.
--real-vocab uses bench/real_vocab.py's set-up instead (Qwen3's 151,936-row head, zh/en chat data, SFT or DPO)
and also lists the operators that allocate the most memory (torch.profiler's profile_memory) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from run import build_model, make_records, rlhf_time_config  # bench/run.py
from toolkit import markdown_table, peak_memory_gb

GROUPS = {  # first match wins
    "matmul (linear layers, LM head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "attention kernel": ("scaled_dot_product", "flash_attention"),
    "optimizer (AdamW, clipping)": ("_foreach", "adam", "Optimizer", "clip_grad", "aten::_fused"),
    "loss (log-softmax, gather)": ("log_softmax", "logsumexp", "gather", "exp_", "nll"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "elementwise, norms, copies, other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-vocab", action="store_true", help="Qwen3's real vocabulary (bench/real_vocab.py set-up)")
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlhf_time.stages.trainers import trainer_for
    from rlhf_time.stages.sft import SFTrainer

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.real_vocab:
            import real_vocab

            setup = real_vocab.parse_args([args.stage, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                           "--threads", str(args.threads)])
            real_vocab.prepare(work, setup)
            trainer = trainer_for(real_vocab.rlhf_time_config(work, setup, name="profile"))
        else:
            records = make_records(args.steps * args.batch_size, seed=0)
            (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            build_model(args.model, work / "model")
            trainer = SFTrainer(rlhf_time_config(work, args, name="profile"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=args.real_vocab) as profiler:
            start = time.perf_counter()
            trainer.train()
            wall_us = (time.perf_counter() - start) * 1e6

    events = [e for e in profiler.key_averages() if e.key.startswith("aten::") or "Optimizer" in e.key]
    by_group: dict[str, float] = defaultdict(float)
    for event in events:
        if event.key.startswith("aten::"):
            by_group[group_of(event.key)] += event.self_cpu_time_total
    operator_us = sum(by_group.values())
    by_group["outside torch operators (Python, data, logging)"] = max(wall_us - operator_us, 0.0)
    model = "256x4 (Qwen3 vocabulary), " + args.stage if args.real_vocab else args.model
    print(f"model {model}, {args.steps} steps x batch {args.batch_size}, {args.threads} threads, "
          f"train() wall time {wall_us / 1e6:.1f} s\n")
    shares = [[group, f"{us / 1e6:.2f}", f"{us / wall_us:.1%}"] for group, us in sorted(by_group.items(), key=lambda kv: -kv[1])]
    print("\n".join(markdown_table(["where", "seconds", "share"], shares)))
    print("\ntop operators by self time:")
    top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:15]
    for event in top:
        print(f"  {event.key:55s} {event.self_cpu_time_total / 1e6:7.2f} s  x{event.count}")
    if args.real_vocab:
        print(f"\npeak RSS {peak_memory_gb():.2f} GB; "
              "operators by memory allocated (sum over calls, GB):")
        for event in sorted(events, key=lambda e: -e.self_cpu_memory_usage)[:10]:
            if event.self_cpu_memory_usage > 0:
                print(f"  {event.key:55s} {event.self_cpu_memory_usage / 2**30:7.2f} GB  x{event.count}")


if __name__ == "__main__":
    main()
