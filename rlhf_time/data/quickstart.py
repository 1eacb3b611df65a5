"""The bundled quickstart task: write a number's digits as Chinese numerals (数字转中文).

"把数字写成中文：4072" -> "四零七二". A tiny model cannot know this before training and learns it within a minute
or two on a laptop CPU; the mapping is per digit, so exact match on unseen numbers shows real learning.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHINESE_DIGITS = "零一二三四五六七八九"
PROMPT = "把数字写成中文：{number}"
BUNDLED_DIR = Path(__file__).parent / "bundled"
TRAIN_FILE = BUNDLED_DIR / "quickstart_train.jsonl"
EVAL_FILE = BUNDLED_DIR / "quickstart_eval.jsonl"


def to_chinese(number: str) -> str:
    return "".join(CHINESE_DIGITS[int(digit)] for digit in number)


def make_records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records, seen = [], set(exclude)
    while len(records) < count:
        number = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
        if number in seen:
            continue
        seen.add(number)
        records.append({"prompt": PROMPT.format(number=number), "response": to_chinese(number)})
    return records


def write_bundled_files(train_count: int = 2000, eval_count: int = 64) -> None:
    """Regenerate the shipped files (deterministic); eval numbers never occur in training."""
    eval_records = make_records(eval_count, seed=1)
    train_records = make_records(train_count, seed=0, exclude={r["prompt"].split("：")[1] for r in eval_records})
    for path, records in ((TRAIN_FILE, train_records), (EVAL_FILE, eval_records)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_preference_records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """Pairs for the reward/DPO examples: chosen = the right numerals, rejected = other numerals of the same length."""
    rng = random.Random(seed)
    pairs = []
    for record in make_records(count, seed=seed + 100, exclude=exclude):
        chosen = record["response"]
        rejected = chosen
        while rejected == chosen:
            rejected = "".join(rng.choice(CHINESE_DIGITS) for _ in chosen)
        pairs.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def make_unpaired_records(pairs: list[dict[str, str]], seed: int) -> list[dict]:
    """KTO's unpaired split of preference pairs: each pair's chosen reply labelled true and its rejected one false,
    shuffled so that no pair stays together (reshuffled until no two neighbouring records share a prompt)."""
    records = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
               for p in pairs for side in ("chosen", "rejected")]
    rng = random.Random(seed)
    rng.shuffle(records)
    while any(a["prompt"] == b["prompt"] for a, b in zip(records, records[1:])):
        rng.shuffle(records)
    return records


if __name__ == "__main__":
    write_bundled_files()
