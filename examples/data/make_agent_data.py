"""Writes the multiply-tool data of the agent examples next to this script (deterministic: seed 0):

- agent_sft.jsonl: 2,000 demonstrations {"messages", "tools"}: the user asks for the product of two 3-digit numbers,
  the assistant calls multiply with {"a", "b"}, the tool returns the product, the assistant answers with it;
- agent_prompts.jsonl (200) and agent_eval.jsonl (50, held out): prompt-only records {"prompt", "answer", "tools"}
  for a tool-calling RL stage (answer: the product).

No pair of factors appears in two files. Run: python examples/data/make_agent_data.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = ("What is the product of {a} and {b}?", "Multiply {a} and {b}.", "Compute the product of {a} and {b}.",
             "What do you get when you multiply {a} and {b}?", "Calculate the product of {a} and {b}.")
SIZES = {"agent_sft.jsonl": 2000, "agent_prompts.jsonl": 200, "agent_eval.jsonl": 50}


def multiply_tool():
    """examples/tools.py's multiply and its JSON schema."""
    from rlhf_time.agents import tool_schema

    spec = importlib.util.spec_from_file_location("example_tools", HERE.parent / "tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.multiply, tool_schema(module.multiply)


def demonstration(a: int, b: int, question: str, multiply, schema: dict) -> dict:
    product = str(multiply(a, b))
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}]},
        {"role": "tool", "content": product},
        {"role": "assistant", "content": product}], "tools": [schema]}


def make(out: Path, seed: int = 0) -> None:
    multiply, schema = multiply_tool()
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < sum(SIZES.values()):
        pairs.add((rng.randint(100, 999), rng.randint(100, 999)))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    start = 0
    for name, size in SIZES.items():
        lines = []
        for a, b in pairs[start : start + size]:
            question = rng.choice(QUESTIONS).format(a=a, b=b)
            if name == "agent_sft.jsonl":
                record = demonstration(a, b, question, multiply, schema)
            else:
                record = {"prompt": question, "answer": str(multiply(a, b)), "tools": [schema]}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        (out / name).write_text("".join(lines), encoding="utf-8")
        start += size


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the three files into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make(args.out, args.seed)
