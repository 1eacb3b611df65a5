"""The order of examples: which examples form each micro-batch, per epoch, as a pure function of the seed.

Because the plan is a pure function of (seed, epoch), resuming is exact: re-plan the epoch and skip the
batches already done.
"""

from __future__ import annotations

import random
from typing import Optional

MEGA_BATCH_FACTOR = 50


def plan_batches(lengths: list[int], *, batch_size: int, max_tokens_per_batch: Optional[int] = None,
                 group_by_length: bool = True, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False) -> list[list[int]]:
    """Micro-batches of example indices for one epoch; every example appears exactly once (unless drop_last).

    group_by_length: the shuffled order is cut into mega-chunks of 50 batches, each sorted by length and cut
    into batches (by count, or by a padded-token budget), and the batch order is shuffled again -- batches of
    similar lengths (little padding) in a random order. Without it, consecutive slices of the shuffled order,
    so a batch of 8 is exactly two consecutive batches of 4. shuffle=False keeps the file order (with grouping,
    each mega-chunk is still sorted by length). With a token budget, a batch holds as many examples as fit in
    max_len_in_batch * n <= max_tokens_per_batch (at least one). drop_last drops a final partial batch (count mode).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # One stream per (seed, epoch), independent of batch_size: without grouping, batch 8 = two batches of 4.
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if not group_by_length:
        batches = _cut(order, lengths, batch_size, max_tokens_per_batch)
    else:
        chunk = batch_size * MEGA_BATCH_FACTOR
        batches = []
        for start in range(0, len(order), chunk):
            mega = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
            batches += _cut(mega, lengths, batch_size, max_tokens_per_batch)
        if shuffle:
            rng.shuffle(batches)
    if drop_last and max_tokens_per_batch is None:  # the partial batch may sit anywhere once batches are shuffled
        batches = [b for b in batches if len(b) == batch_size]
    return batches


def _cut(order: list[int], lengths: list[int], batch_size: int, max_tokens: Optional[int]) -> list[list[int]]:
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, current, longest = [], [], 0
    for index in order:
        candidate = max(longest, lengths[index])
        if current and candidate * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, candidate = [], lengths[index]
        current.append(index)
        longest = candidate
    if current:
        batches.append(current)
    return batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's share: every world_size-th batch, the same count on every rank (the ragged tail is dropped)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size == 1:
        return batches
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]
