"""Builders shared by the GRPO tests (single process and torchrun): a dense reward, injected completions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_time import GRPOTrainer
from rlhf_time.experience.sampler import Rollout


def char_share(prompts, completions, response, **_):
    """Dense reward on the quickstart task: share of positions where the completion has the reference's character."""
    return [sum(a == b for a, b in zip(c, r)) / max(len(c), len(r)) for c, r in zip(completions, response)]


def text_hash(prompts, completions, **_):
    """A reward in [0, 1) that differs between almost any two different completions (a CRC of the text): groups have
    non-zero advantages whatever the sampler draws, for tests about the update rather than the reward."""
    import zlib

    return [zlib.crc32(c.encode()) / 2**32 for c in completions]


def teacher_forced_rollout(model, prompt_ids: list[list[int]], completions: list[list[int]], *, pad_token_id: int,
                           temperature: float = 1.0, truncated: list[bool] | None = None) -> Rollout:
    """A Rollout of given completions, laid out as sampling lays them out, with log-probs from one full forward
    (written out here: log_softmax of the logits / temperature), independent of rlhf_time.experience.sampler.sample."""
    prompt_length, width = max(map(len, prompt_ids)), max(map(len, completions))
    rows, masks = [], []
    for prompt, completion in zip(prompt_ids, completions):
        rows.append([pad_token_id] * (prompt_length - len(prompt)) + prompt + completion
                    + [pad_token_id] * (width - len(completion)))
        masks.append([0] * (prompt_length - len(prompt)) + [1] * (len(prompt) + len(completion))
                     + [0] * (width - len(completion)))
    device = next(model.parameters()).device
    input_ids, attention_mask = torch.tensor(rows, device=device), torch.tensor(masks, device=device)
    completion_mask = attention_mask[:, prompt_length:].bool()
    with torch.no_grad():
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits.float()
    log_probs = F.log_softmax(logits[:, prompt_length - 1 : -1] / temperature, -1)  # (N, C, V)
    logps = log_probs.gather(-1, input_ids[:, prompt_length:, None]).squeeze(-1) * completion_mask
    entropies = -(log_probs.exp() * log_probs).sum(-1) * completion_mask
    truncated = torch.tensor(truncated if truncated is not None else [False] * len(rows), device=device)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_length=prompt_length,
                   completion_mask=completion_mask, truncated=truncated, logps=logps, entropies=entropies)


class InjectedGRPOTrainer(GRPOTrainer):
    """Completions fixed by the test instead of sampled: for prompt p, completion k of its group is the reference
    answer cut after k characters (so rewards differ within a group), closed by the end-of-turn token."""

    def sample_rollout(self, prompt_ids, *, num_samples, greedy, generator):
        answers = {tuple(ids): answer for dataset in (self.train_dataset, self.eval_dataset) if dataset is not None
                   for ids, answer in zip(dataset.input_ids, dataset.columns["response"])}
        completions = []
        for ids in prompt_ids:
            answer = answers[tuple(ids)]
            for k in range(num_samples):
                text = answer[: k + 1] if k % 2 == 0 else answer[::-1][: k + 1]
                completions.append(self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id])
        prompts = [ids for ids in prompt_ids for _ in range(num_samples)]
        return teacher_forced_rollout(self.model, prompts, completions, pad_token_id=self.tokenizer.pad_token_id,
                                      temperature=self.config.temperature)
