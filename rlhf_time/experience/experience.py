"""One path from prompts to experience for every on-policy stage: sample -> score -> per-step metrics.

`collect` samples each micro-batch of prompt indices through a sampling engine, scores the completions with the
reward scorer, and returns one `Experience` per micro-batch; `experience_metrics` turns a step's experience into
the metrics every on-policy stage logs under the same names:

    train/reward, train/reward_std, train/rewards/<fn>     the rewards as the reward functions / model gave them
    train/frac_reward_zero_std                             groups whose completions all got the same reward (G > 1)
    train/completions/{mean,min,max}_length, train/completions/truncated_ratio
    train/entropy                                          of the sampling distribution, per sampled token
    train/turns, train/tools/{calls_per_episode,error_rate,out_of_turns_ratio}    multi-turn episodes only

A stage adds its own (GRPO's clip ratios, PPO's KL and value metrics) next to these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as torch_dist

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data.prompts import PromptDataset
from rlhf_time.experience.agent_loop import episode_columns
from rlhf_time.experience.rewards import RewardScorer
from rlhf_time.experience.sampler import Rollout
from rlhf_time.runtime.distributed import all_reduce_sum


@dataclass
class Experience:
    """One micro-batch of sampled, scored completions; rows i*G .. i*G+G-1 are prompt indices[i]'s G samples."""

    indices: list[int]  # prompt indices in the data set
    rollout: Rollout
    rewards: torch.Tensor  # (N,) float32: the weighted sum of the rewards
    per_function: list[list[Optional[float]]]  # each reward function's values (None: does not apply)
    texts: list[str]  # the completions as the reward functions saw them
    group_size: int = 1  # G completions per prompt

    def batch(self) -> dict[str, torch.Tensor]:
        """The tensors a micro-batch trains on: the sequences, labels on the sampled tokens (log-probs are taken
        there), loss_mask on the completion tokens (N, C), old_logps sampling's own log-probs."""
        rollout = self.rollout
        labels = rollout.input_ids.masked_fill(rollout.attention_mask == 0, IGNORE_INDEX)
        labels[:, : rollout.prompt_length] = IGNORE_INDEX
        # only sampled tokens: a multi-turn episode's tool results and environment messages are context
        labels[:, rollout.prompt_length :] = labels[:, rollout.prompt_length :].masked_fill(~rollout.completion_mask,
                                                                                              IGNORE_INDEX)
        return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                "position_ids": rollout.position_ids, "labels": labels, "loss_mask": rollout.completion_mask,
                "old_logps": rollout.logps, "truncated": rollout.truncated, "entropies": rollout.entropies}


def score(scorer: RewardScorer, tokenizer, dataset: PromptDataset, indices: list[int], rollout: Rollout,
          group_size: int = 1) -> Experience:
    """A rollout of dataset[indices] (each prompt's group_size completions in consecutive rows), scored."""
    return score_all(scorer, tokenizer, dataset, [(indices, rollout)], group_size)[0]


def score_all(scorer: RewardScorer, tokenizer, dataset: PromptDataset, rollouts: Sequence[tuple[list[int], Rollout]],
              group_size: int = 1) -> list[Experience]:
    """score() of each (indices, rollout), the reward calls of all of them at once when the scorer is concurrent
    (async reward functions, worker threads or a timeout)."""
    requests, texts = [], []
    for indices, rollout in rollouts:
        completion_ids = rollout.completion_lists()
        columns = {**dataset.reward_columns(indices, group_size), "completion_ids": completion_ids}
        if rollout.episodes is not None:  # multi-turn: the final assistant turn is the completion scored
            texts.append([episode.final_text for episode in rollout.episodes])
            columns.update(episode_columns(rollout.episodes))
        else:
            texts.append(tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
        prompts = [dataset.prompts[i] for i in indices for _ in range(group_size)]
        requests.append((prompts, texts[-1], columns))
    return [Experience(indices, rollout, torch.tensor(totals, dtype=torch.float32), per_function, completions,
                       group_size)
            for (indices, rollout), (totals, per_function), completions
            in zip(rollouts, scorer.score_many(requests), texts)]


def collect(sample: Callable[..., Rollout], scorer: RewardScorer, tokenizer, dataset: PromptDataset,
            micro_batches: Sequence[list[int]], *, group_size: int = 1,
            generators: Optional[Sequence[torch.Generator]] = None, together: bool = False) -> list[Experience]:
    """Each micro-batch of prompt indices sampled (`sample(indices, num_samples=, greedy=, generator=)`,
    group_size completions per prompt), then all of them scored (concurrently, for a concurrent scorer).
    together: one `sample` call for all micro-batches (the first one's generator), split back into micro-batches."""
    if together and len(micro_batches) > 1:
        whole = sample([i for indices in micro_batches for i in indices], num_samples=group_size, greedy=False,
                       generator=generators[0] if generators is not None else None)
        parts = split_rollout(whole, [len(indices) * group_size for indices in micro_batches])
        rollouts = list(zip(micro_batches, parts))
    else:
        rollouts = [(indices, sample(indices, num_samples=group_size, greedy=False,
                                     generator=generators[i] if generators is not None else None))
                    for i, indices in enumerate(micro_batches)]
    return score_all(scorer, tokenizer, dataset, rollouts, group_size)


def split_rollout(rollout: Rollout, sizes: Sequence[int]) -> list[Rollout]:
    """Consecutive row blocks of `sizes` rows, each cut to its own columns: the prompt padding that no row of the
    block has on the left, the completion columns past the block's longest sequence on the right."""
    parts, start, prompt_length = [], 0, rollout.prompt_length
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        attended = rollout.attention_mask[rows].bool().any(0)  # (P + C,)
        first = int(attended[:prompt_length].int().argmax())  # every prompt has a token
        completion_columns = attended[prompt_length:].nonzero()
        width = int(completion_columns.max()) + 1 if len(completion_columns) else 0
        columns = slice(first, prompt_length + width)
        parts.append(Rollout(
            input_ids=rollout.input_ids[rows, columns], attention_mask=rollout.attention_mask[rows, columns],
            prompt_length=prompt_length - first, completion_mask=rollout.completion_mask[rows, :width],
            truncated=rollout.truncated[rows], logps=rollout.logps[rows, :width],
            entropies=rollout.entropies[rows, :width],
            episodes=rollout.episodes[rows] if rollout.episodes is not None else None))
    return parts


def global_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation (n - 1) of `values` over all ranks (each rank passes its own)."""
    n = all_reduce_sum(torch.tensor(float(values.numel()), device=values.device, dtype=torch.float64))
    total = all_reduce_sum(values.double().sum())
    squares = all_reduce_sum((values.double() ** 2).sum())
    mean = total / n
    std = ((squares - n * mean**2).clamp(min=0) / (n - 1).clamp(min=1)).sqrt()
    return mean.to(values.dtype), std.to(values.dtype)


def experience_metrics(experiences: Sequence[Experience], reward_names: Sequence[str]) -> dict[str, float]:
    """The step's reward, group, length and entropy statistics over all ranks (the names in the module doc)."""
    device = experiences[0].rollout.input_ids.device
    rewards = torch.cat([e.rewards for e in experiences]).to(device)
    lengths = torch.cat([e.rollout.completion_lengths for e in experiences]).float().to(device)
    truncated = torch.cat([e.rollout.truncated for e in experiences]).float().to(device)
    entropy = sum(e.rollout.entropies.sum() for e in experiences).to(device)  # 0 past each completion's end
    mean, std = global_mean_std(rewards)
    n = all_reduce_sum(torch.tensor(float(rewards.numel()), device=device))
    sums = all_reduce_sum(torch.stack([lengths.sum(), truncated.sum(), entropy.float()]))
    length, truncated_rows, entropy = sums.tolist()
    n = max(float(n), 1.0)
    metrics = {
        "train/reward": float(mean), "train/reward_std": float(std),
        "train/completions/mean_length": length / n,
        "train/completions/min_length": _all_reduce(lengths.min(), torch_dist.ReduceOp.MIN),
        "train/completions/max_length": _all_reduce(lengths.max(), torch_dist.ReduceOp.MAX),
        "train/completions/truncated_ratio": truncated_rows / n,
        "train/entropy": entropy / max(length, 1.0),
    }
    group = experiences[0].group_size
    if group > 1:
        grouped = rewards.view(-1, group)
        flat = all_reduce_sum(torch.stack([(grouped.amax(1) == grouped.amin(1)).float().sum(),
                                           torch.tensor(float(grouped.shape[0]), device=device)]))
        metrics["train/frac_reward_zero_std"] = float(flat[0]) / max(float(flat[1]), 1.0)
    if experiences[0].rollout.episodes is not None:
        metrics.update(episode_metrics([episode for e in experiences for episode in e.rollout.episodes], device))
    for f, name in enumerate(reward_names):
        values = [v for e in experiences for v in e.per_function[f] if v is not None]
        total, count = all_reduce_sum(torch.tensor([float(sum(values)), float(len(values))], device=device)).tolist()
        if count:
            metrics[f"train/rewards/{name}"] = total / count
    return metrics


def episode_metrics(episodes: Sequence, device) -> dict[str, float]:
    """Multi-turn episodes over all ranks: assistant turns and tool calls per episode, the share of calls that
    failed, and the share of episodes that still had a reply pending at rollout.max_tool_turns."""
    sums = all_reduce_sum(torch.tensor([float(len(episodes)), float(sum(e.turns for e in episodes)),
                                        float(sum(e.tool_calls for e in episodes)),
                                        float(sum(e.failed_tool_calls for e in episodes)),
                                        float(sum(e.out_of_replies for e in episodes))], device=device))
    count, turns, calls, failed, out_of_replies = sums.tolist()
    count = max(count, 1.0)
    return {"train/turns": turns / count, "train/tools/calls_per_episode": calls / count,
            "train/tools/error_rate": failed / max(calls, 1.0), "train/tools/out_of_turns_ratio": out_of_replies / count}


def _all_reduce(value: torch.Tensor, op) -> float:
    value = value.detach().float().clone()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(value, op=op)
    return float(value)
