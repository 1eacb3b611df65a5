"""Reward functions for examples/agent_grpo.yaml (multiply two 3-digit numbers with the `multiply` tool).

Multi-turn rollouts give reward functions the final assistant turn as `completions`, the whole episode as
`trajectories` and the tool-call counts as `tool_calls` ({"calls": n, "failed": m}), besides the record's fields.
"""


def correct_product(prompts, completions, answer, **kwargs):
    """1 when the final answer is the record's product (spaces ignored), else 0: the success the docs report."""
    return [float(c.strip().replace(" ", "") == a) for c, a in zip(completions, answer)]


def product_digits(prompts, completions, answer, **kwargs):
    """Dense credit in [0, 1]: share of positions of the final answer that hold the product's digit."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / max(len(c.strip()), len(a)) for c, a in zip(completions, answer)]


def clean_tool_use(prompts, completions, tool_calls, **kwargs):
    """1 for an episode that called a tool exactly once and the call ran, else 0."""
    return [float(t["calls"] == 1 and t["failed"] == 0) for t in tool_calls]
