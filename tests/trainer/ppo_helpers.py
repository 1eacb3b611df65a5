"""Reward functions of the PPO tests."""


def one(prompts, completions, **_):
    """1.0 for every completion: returns differ from an untrained critic's values by about 1."""
    return [1.0] * len(completions)


def char_share(prompts, completions, response, **_):
    """Dense reward on the quickstart task: share of positions where the completion has the reference's character."""
    return [sum(a == b for a, b in zip(c, r)) / max(len(c), len(r), 1) for c, r in zip(completions, response)]
