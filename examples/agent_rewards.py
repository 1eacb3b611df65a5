"""Reward functions for examples/agent_grpo.yaml (multiply two 3-digit numbers with the `multiply` tool).

Multi-turn rollouts give reward functions the final assistant turn as `completions`, the whole episode as
`trajectories` and the tool-call counts as `tool_calls` ({"calls": n, "failed": m}), besides the record's fields.
"""

import re


def correct_product(prompts, completions, answer, **kwargs):
    """1 when the final answer is the record's product (spaces ignored), else 0: the success the docs report."""
    return [float(c.strip().replace(" ", "") == a) for c, a in zip(completions, answer)]


def product_digits(prompts, completions, answer, **kwargs):
    """Dense credit in [0, 1]: share of positions of the final answer that hold the product's digit."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / max(len(c.strip()), len(a)) for c, a in zip(completions, answer)]


def clean_tool_use(prompts, completions, tool_calls, **kwargs):
    """1 for an episode that called a tool exactly once and the call ran, else 0."""
    return [float(t["calls"] == 1 and t["failed"] == 0) for t in tool_calls]


def right_arguments(prompts, completions, trajectories, **kwargs):
    """Dense credit in [0, 1] for the step the partly trained model fails most: share of the question's digits
    (its two numbers, in order) that the first call's arguments hold in place; 0 without a call."""
    scores = []
    for trajectory in trajectories:
        question = next(m["content"] for m in trajectory if m["role"] == "user")
        wanted = re.findall(r"\d+", question)
        calls = next((m.get("tool_calls") for m in trajectory if m["role"] == "assistant"), None) or []
        given = [str(v) for v in calls[0]["function"]["arguments"].values()] if calls else []
        digits = sum(x == y for w, g in zip(wanted, given) for x, y in zip(w, g))
        scores.append(digits / max(1, sum(len(w) for w in wanted)))
    return scores


def copies_result(prompts, completions, trajectories, **kwargs):
    """1 when the final answer repeats the last tool result (spaces ignored), right product or not: credit for the
    second step, copying, which the partly trained model gets wrong on 5-digit results."""
    scores = []
    for completion, trajectory in zip(completions, trajectories):
        results = [m["content"] for m in trajectory if m["role"] == "tool"]
        scores.append(float(bool(results) and completion.strip().replace(" ", "") == results[-1].strip()))
    return scores
