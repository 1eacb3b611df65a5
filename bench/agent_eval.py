"""Held-out success of a tool-calling model on the multiply task (examples/data/agent_eval.jsonl), greedy:

1. generate from the prompt (the user's question, the tools in the template's layout);
2. parse the calls (rlhf_time.agents), run them with examples/tools.py's multiply, append the tool turns
   (render_tool_turns) and generate the final answer;
3. count well-formed calls, calls with the right arguments, final answers that repeat the tool's result, and final
   answers equal to the record's `answer` (the success rate).

    python bench/agent_eval.py outputs/agent_sft/final [--limit 50] [--data examples/data/agent_eval.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate(folder: str, data: Path, limit: int, max_new_tokens: int = 128) -> dict:
    from rlhf_time.agents import (ToolCall, assistant_message, load_tools, parse_tool_calls, render_tool_turns,
                                  run_tool_call, tool_call_style, tool_result_messages, tools_by_name)
    from rlhf_time.inference import InferenceModel

    model = InferenceModel.load(folder, {"disable_progress_bar": True})
    tokenizer, encoder = model.tokenizer, model.encoder
    style = tool_call_style(tokenizer)
    tools = tools_by_name(load_tools(["tools.py:multiply"], base_dir=ROOT / "examples"))
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:limit]]
    questions = [[{"role": "user", "content": r["prompt"]}] for r in records]
    prompts = [encoder.generation_prompt(q, tools=r["tools"]) for q, r in zip(questions, records)]
    first = model.complete(prompts, max_new_tokens=max_new_tokens, do_sample=False)
    followups, tool_results = [], []
    counts = {"records": len(records), "parsed_calls": 0, "right_arguments": 0, "answers_equal_tool_result": 0,
              "correct_answers": 0}
    for record, question, prompt, text in zip(records, questions, prompts, first):
        calls = parse_tool_calls(text, style)
        good = [c for c in calls if isinstance(c, ToolCall)]
        counts["parsed_calls"] += bool(good) and len(good) == len(calls)
        factors = [int(w.strip(".?*")) for w in record["prompt"].split() if w.strip(".?*").isdigit()]
        counts["right_arguments"] += any(c.name == "multiply" and c.arguments == {"a": factors[0], "b": factors[1]}
                                         for c in good)
        if not calls:  # answered without a call: that is its final answer
            followups.append(None)
            tool_results.append(None)
            continue
        results = [run_tool_call(c, tools, timeout=5)[0] for c in calls]
        tool_results.append(results[0])
        messages = [*question, assistant_message(text, calls, style)]
        appended = render_tool_turns(tokenizer, messages, tool_result_messages(calls, results), record["tools"])
        followups.append(prompt + text + tokenizer.eos_token + appended)
    second = iter(model.complete([f for f in followups if f is not None], max_new_tokens=16, do_sample=False))
    examples = []
    for record, text, followup, result in zip(records, first, followups, tool_results):
        answer = text if followup is None else next(second)
        counts["correct_answers"] += answer.strip() == record["answer"]
        counts["answers_equal_tool_result"] += result is not None and answer.strip() == result
        if len(examples) < 3:
            examples.append({"prompt": record["prompt"], "call": text, "answer": answer, "expected": record["answer"]})
    counts["success_rate"] = counts["correct_answers"] / max(1, counts["records"])
    return {"counts": counts, "examples": examples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a trained model folder, e.g. outputs/agent_sft/final")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "agent_eval.jsonl")
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.folder, args.data, args.limit), ensure_ascii=False, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
