"""Held-out success of a tool-calling model on the multiply task (examples/data/agent_eval.jsonl): one greedy episode
per question through the tool loop that predict, chat and training run (InferenceModel.run_tools), counting

- right_calls: the first turn called multiply once with the question's two numbers, and no call failed;
- answers_equal_tool_result: the final answer repeats what the tool returned;
- success: the final answer equals the record's `answer` (the product);
- by_template: right calls and successes of each question wording ("What is N times N?", ...): a partly trained
  model copies the numbers of some wordings and not of others.

    python bench/agent_eval.py outputs/agent_sft/final [--limit 50] [--data examples/data/agent_eval.jsonl]
                               [--samples 4 --temperature 1.0]

--samples/--temperature sample episodes instead (counts over all of them), as GRPO's rollouts do: on
examples/data/agent_prompts.jsonl this shows which questions give GRPO's groups a mix of right and wrong episodes.

A checkpoint-N folder is evaluated in the layout of its run (its config.yaml), as final/ is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_DATA = ROOT / "examples" / "data" / "agent_eval.jsonl"
MULTIPLY = str(ROOT / "examples" / "tools.py") + ":multiply"


def right_call(episode, question: str) -> bool:
    """The first turn called multiply once, with the question's two numbers (in either order), and nothing failed."""
    factors = sorted(int(n) for n in re.findall(r"\d+", question))
    calls = episode.messages[0].get("tool_calls") or [] if episode.messages else []
    return (episode.failed_tool_calls == 0 and len(calls) == 1 and calls[0]["function"]["name"] == "multiply"
            and sorted(calls[0]["function"]["arguments"].values()) == factors)


def evaluate(folder: str, data: Path = EVAL_DATA, limit: int = 50, max_new_tokens: int = 160, samples: int = 1,
             temperature: float = 0.0) -> dict:
    """Greedy episodes (temperature 0), or `samples` sampled episodes per question at `temperature`."""
    from rlhf_time.inference import InferenceModel

    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:limit]]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    model = InferenceModel.load(folder, {"disable_progress_bar": True, "max_new_tokens": max_new_tokens, **sampling})
    records = [record for record in records for _ in range(samples if temperature > 0 else 1)]
    episodes = model.run_tools([[{"role": "user", "content": r["prompt"]}] for r in records], tools=[MULTIPLY])
    counts = {"n": len(records), "right_calls": 0, "answers_equal_tool_result": 0, "correct_answers": 0}
    by_template: dict[str, dict[str, int]] = {}
    examples = []
    for record, episode in zip(records, episodes):
        answer = episode.final_text.strip().replace(" ", "")
        results = [m["content"] for m in episode.messages if m["role"] == "tool"]
        called, correct = right_call(episode, record["prompt"]), answer == record["answer"]
        counts["right_calls"] += called
        counts["answers_equal_tool_result"] += bool(results) and answer == results[-1].strip()
        counts["correct_answers"] += correct
        template = by_template.setdefault(re.sub(r"\d+", "N", record["prompt"]),
                                          {"n": 0, "right_calls": 0, "correct_answers": 0})
        template["n"] += 1
        template["right_calls"] += called
        template["correct_answers"] += correct
        if len(examples) < 3:
            examples.append({"prompt": record["prompt"], "episode": episode.messages, "expected": record["answer"]})
    n = max(1, counts["n"])
    return {"success": counts["correct_answers"] / n, "right_call": counts["right_calls"] / n, **counts,
            "by_template": dict(sorted(by_template.items())), "examples": examples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a trained model folder, e.g. outputs/agent_sft/final or .../checkpoint-900")
    parser.add_argument("--data", type=Path, default=EVAL_DATA)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--samples", type=int, default=1, help="episodes per question when --temperature > 0")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.folder, args.data, args.limit, samples=args.samples, temperature=args.temperature),
                     ensure_ascii=False, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
