"""Mixtures of data sets: draw from each source its stated share of the examples.

With sizes n_i and weights w_i, the mixture has N = sum(n_i) examples (an epoch is as long as the concatenation)
and takes c_i = round(N * w_i / sum(w)) from source i (largest remainders make the counts sum to N). A source is
drawn without replacement while it lasts: c_i <= n_i takes a seeded random subset; c_i > n_i takes the whole
source floor(c_i / n_i) times plus a random subset for the rest (oversampling repeats every example equally).
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """How many examples each source contributes: proportional to its weight, summing to sum(sizes)."""
    total, weight_sum = sum(sizes), float(sum(weights))
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(size: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into range(size): whole passes first, then a random subset without replacement."""
    if size == 0:
        return []
    passes, rest = divmod(count, size)
    return [i for _ in range(passes) for i in range(size)] + sorted(rng.sample(range(size), rest))


def mixture_indices(sizes: Sequence[int], weights: Sequence[float], seed: int) -> list[list[int]]:
    """Per source, the indices of its examples in the mixture (deterministic in seed)."""
    rng = random.Random(seed)
    return [draw(size, count, rng) for size, count in zip(sizes, mixture_counts(sizes, weights))]
