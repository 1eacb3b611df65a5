"""Reward functions for examples/grpo.yaml (the quickstart task: write a number's digits as Chinese numerals).

A reward function gets the prompts, the sampled completions and every other field of the data records by name
(here `answer`), one value per completion, and returns one float per completion (or None: does not apply).
"""


def digit_accuracy(prompts, completions, answer, **kwargs):
    """Dense reward in [0, 1]: share of positions holding the right numeral (extra or missing numerals count wrong)."""
    return [sum(a == b for a, b in zip(c.strip(), r)) / max(len(c.strip()), len(r))
            for c, r in zip(completions, answer)]


def only_numerals(prompts, completions, **kwargs):
    """Format reward: 1 when the completion is made of Chinese numerals only, else 0."""
    numerals = set("零一二三四五六七八九")
    return [float(bool(c.strip()) and set(c.strip()) <= numerals) for c in completions]
