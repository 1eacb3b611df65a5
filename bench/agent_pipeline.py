"""The tool-use pipeline on the tiny model, measured: SFT on the multiply demonstrations (examples/agent_sft.yaml),
stopped while success is partial (one of its checkpoints), then GRPO with the tool (examples/agent_grpo.yaml) over
several seeds; held-out success after each.

    python bench/agent_pipeline.py [--sft-steps 1500] [--checkpoints 300,400,500] [--start-from 500]
                                   [--grpo-steps 100] [--seeds 1,2,3] [--limit 50] [--out bench/out/agent]
                                   [key=value overrides of the GRPO runs, last]

The defaults are the measurement of docs/stages.md ("Agents, measured"): the example's GRPO settings from SFT step 500,
seeds 1-3; run it with OMP_NUM_THREADS=1 on a shared machine. Other rows: e.g. `--reuse-sft --checkpoints 400
--start-from 400 --seeds 1,2,3 learning_rate=2e-4 temperature=1.0` plus other rewards, with absolute paths
(overrides are not resolved against the YAML's folder): R=$PWD/examples/agent_rewards.py, then
`"rollout.reward_funcs=[$R:correct_product,$R:right_arguments,$R:clean_tool_use]" "rollout.reward_weights=[1.0,0.5,0.2]"`.

The SFT keeps the example's schedule (max_steps = --sft-steps, cosine) and saves a checkpoint at each of
--checkpoints; GRPO starts from checkpoint --start-from. Success (bench/agent_eval.py): the final answer of a greedy
episode through the tool loop equals the product; right call: the first turn called multiply with the question's
two numbers and nothing failed. Both on the held-out questions of examples/data/agent_eval.jsonl. With --reuse-sft
an SFT run already in --out is evaluated again instead of retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def train(yaml_file: str, overrides: list[str]) -> float:
    """Seconds one `rlhf-time train` took."""
    from rlhf_time.cli import main as cli

    started = time.perf_counter()
    if cli(["train", str(EXAMPLES / yaml_file), *overrides]) != 0:
        raise SystemExit(f"rlhf-time train {yaml_file} failed")
    return time.perf_counter() - started


def table(result: dict) -> str:
    lines = ["| model | success | right call |", "|---|---:|---:|"]
    for step, scores in result["sft"].items():
        lines.append(f"| SFT step {step} | {scores['correct_answers']}/{scores['n']} | {scores['right_calls']}/{scores['n']} |")
    for seed, scores in result["grpo"].items():
        lines.append(f"| SFT step {result['start_from']} + GRPO {result['grpo_steps']} steps, seed {seed} "
                     f"| {scores['correct_answers']}/{scores['n']} | {scores['right_calls']}/{scores['n']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=1500, help="the SFT schedule's length (max_steps)")
    parser.add_argument("--checkpoints", type=integers, default=[300, 400, 500])
    parser.add_argument("--start-from", type=int, default=500, help="the SFT checkpoint GRPO starts from")
    parser.add_argument("--grpo-steps", type=int, default=100)
    parser.add_argument("--seeds", type=integers, default=[1, 2, 3], help="one GRPO run per seed")
    parser.add_argument("--sft-seed", type=int, default=42)
    parser.add_argument("--limit", type=int, default=50, help="held-out questions")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "agent")
    parser.add_argument("--reuse-sft", action="store_true")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the GRPO runs")
    args = parser.parse_args(argv)
    if args.start_from not in args.checkpoints:
        parser.error("--start-from must be one of --checkpoints")
    from agent_eval import evaluate

    out = args.out.resolve()
    quiet = ["overwrite_output_dir=true", "disable_progress_bar=true", "report_to=none"]
    sft_dir = out / "agent_sft"
    result = {"sft_steps": args.sft_steps, "start_from": args.start_from, "grpo_steps": args.grpo_steps,
              "sft": {}, "grpo": {}, "seconds": {}}
    if not args.reuse_sft:
        result["seconds"]["sft"] = round(train("agent_sft.yaml", [
            f"output_dir={out}", f"seed={args.sft_seed}", f"max_steps={args.sft_steps}", "save_strategy=steps",
            f"save_steps={math.gcd(*args.checkpoints)}", *quiet]))
    for step in args.checkpoints:
        result["sft"][step] = evaluate(str(sft_dir / f"checkpoint-{step}"), limit=args.limit)
    for seed in args.seeds:
        result["seconds"][f"grpo_seed{seed}"] = round(train("agent_grpo.yaml", [
            f"output_dir={out / f'grpo_seed{seed}'}", f"seed={seed}", f"max_steps={args.grpo_steps}",
            f"model_name={sft_dir / f'checkpoint-{args.start_from}'}", *quiet, *args.overrides]))
        result["grpo"][seed] = evaluate(str(out / f"grpo_seed{seed}" / "agent_grpo" / "final"), limit=args.limit)
    for scores in [*result["sft"].values(), *result["grpo"].values()]:
        scores.pop("examples")
    print(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    main()
