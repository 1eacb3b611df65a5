"""The tool-use pipeline on the tiny model, measured: SFT on the multiply demonstrations stopped while success is
partial, then GRPO with the tool, held-out success before and after.

    python bench/agent_pipeline.py [--sft-steps 150] [--grpo-steps 60] [--seed 42] [--out bench/out/agent]

Success: the final answer of a greedy episode (the tool loop of predict/chat, rlhf_time.inference.run_tools) equals
the product. Also reported: the share of episodes whose first turn called multiply with the question's two numbers
and nothing failed. Both on the 50 held-out questions of examples/data/agent_eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def held_out_success(folder: str, limit: int = 50) -> dict:
    """Greedy episodes on the held-out questions: success rate and correct-call share."""
    from rlhf_time.inference import InferenceModel

    records = [json.loads(line) for line in (EXAMPLES / "data" / "agent_eval.jsonl").read_text().splitlines()[:limit]]
    model = InferenceModel.load(folder, {"disable_progress_bar": True, "max_new_tokens": 160, "do_sample": False})
    episodes = model.run_tools([[{"role": "user", "content": r["prompt"]}] for r in records],
                               tools=[str(EXAMPLES / "tools.py") + ":multiply"])
    correct = called = 0
    for record, episode in zip(records, episodes):
        correct += episode.final_text.strip().replace(" ", "") == record["answer"]
        factors = [int(n) for n in re.findall(r"\d+", record["prompt"])]
        first = episode.messages[0].get("tool_calls", [])
        called += (episode.failed_tool_calls == 0 and len(first) == 1 and first[0]["function"]["name"] == "multiply"
                   and sorted(first[0]["function"]["arguments"].values()) == sorted(factors))
    return {"success": correct / len(records), "correct_call": called / len(records), "n": len(records)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "agent")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the GRPO run")
    args = parser.parse_args(argv)
    from rlhf_time.cli import main as cli

    out = args.out.resolve()
    common = [f"output_dir={out}", f"seed={args.seed}", "overwrite_output_dir=true", "disable_progress_bar=true",
              "report_to=none"]
    started = time.perf_counter()
    assert cli(["train", str(EXAMPLES / "agent_sft.yaml"), f"max_steps={args.sft_steps}", *common]) == 0
    sft_seconds = time.perf_counter() - started
    sft = held_out_success(str(out / "agent_sft" / "final"))
    started = time.perf_counter()
    assert cli(["train", str(EXAMPLES / "agent_grpo.yaml"), f"max_steps={args.grpo_steps}",
                f"model_name={out / 'agent_sft' / 'final'}", *common, *args.overrides]) == 0
    grpo_seconds = time.perf_counter() - started
    grpo = held_out_success(str(out / "agent_grpo" / "final"))
    result = {"seed": args.seed, "sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps,
              "after_sft": sft, "after_grpo": grpo, "sft_seconds": round(sft_seconds), "grpo_seconds": round(grpo_seconds)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
