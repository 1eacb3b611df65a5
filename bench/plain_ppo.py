"""A plain PPO loop for RLHF, written the direct way with torch and transformers: the peer rlhf_time's PPO is
measured against at the real vocabulary (bench/real_vocab.py ppo), since TRL 1.16 has no PPO trainer.

The algorithm and settings are rlhf_time's PPO defaults (InstructGPT's recipe, Ouyang et al. 2022):
  - sample one completion per prompt (`generate`, temperature 1, no top-k/top-p), stop at the end-of-turn token;
  - old, reference and value estimates in micro-batches; the critic is the policy's starting weights with a new
    scalar head (a 1-label sequence-classification model applied at every position);
  - r_t = -kl_coef (logp_t - ref_logp_t) + score at the last token; GAE (gamma 1, lambda 0.95); advantages
    whitened over the step's completion tokens;
  - `epochs` passes, one optimiser step each (one mini-batch): the clipped surrogate summed over completion tokens
    / the step's tokens, then the critic's clipped value loss x vf_coef with its own AdamW; clip 1.0 on both.
What makes it "plain": each forward returns the logits of every completion position, (micro-batch, C, V) float32,
and log-probs come from log_softmax over them, as most hand-written loops do (`logits_to_keep` already spares the
prompt positions); prompts are read once per completion.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def completion_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                     width: int) -> torch.Tensor:
    """log p(token) of the last `width` tokens of each row, (B, width), from full-vocabulary logits."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
    log_probs = logits[:, :-1].float().log_softmax(-1)  # (B, width, V)
    return log_probs.gather(-1, ids[:, -width:, None]).squeeze(-1)


def completion_values(critic: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      width: int) -> torch.Tensor:
    """V(s_t) at the positions that predict the last `width` tokens, (B, width)."""
    hidden = critic.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return critic.score(hidden[:, -width - 1 : -1]).squeeze(-1).float()


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE backwards over each completion; nothing is bootstrapped past its last token."""
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, advantages + values


def train(model_dir: str, prompts: list[str], reward, *, steps: int, prompts_per_step: int, micro_batch: int,
          max_new_tokens: int, learning_rate: float, clock, epochs: int = 4, kl_coef: float = 0.05,
          gamma: float = 1.0, lam: float = 0.95, clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
          seed: int = 0) -> dict:
    """`steps` PPO steps over `prompts` in order; per step the mean score and the mean completion length."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    critic = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    critic.config.pad_token_id = tokenizer.pad_token_id
    optimizers = [torch.optim.AdamW(m.parameters(), lr=learning_rate, weight_decay=0.0) for m in (policy, critic)]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores_per_step, lengths_per_step, generation_seconds = [], [], 0.0
    clock.start()
    for step in range(steps):
        texts = prompts[step * prompts_per_step : (step + 1) * prompts_per_step]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        policy.eval()
        begin = time.perf_counter()
        with torch.no_grad():
            ids = policy.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        generation_seconds += time.perf_counter() - begin
        policy.train()
        width = ids.shape[1] - encoded.input_ids.shape[1]
        completion = ids[:, -width:]
        ended_before = (completion == stop).int().cumsum(-1) - (completion == stop).int()  # stops before t
        completion_mask = (ended_before == 0).float()  # up to and including the first stop token
        mask = torch.cat([encoded.attention_mask.float(), completion_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0).long()
        rows = [slice(i, i + micro_batch) for i in range(0, len(texts), micro_batch)]
        with torch.no_grad():
            old = torch.cat([completion_logps(policy, ids[r], mask[r], positions[r], width) for r in rows])
            ref = torch.cat([completion_logps(reference, ids[r], mask[r], positions[r], width) for r in rows])
            values = torch.cat([completion_values(critic, ids[r], mask[r], positions[r], width) for r in rows])
        answers = tokenizer.batch_decode(completion * completion_mask.long() + tokenizer.pad_token_id * (1 - completion_mask.long()),
                                         skip_special_tokens=True)
        scores = torch.tensor(reward(texts, answers), dtype=torch.float32)
        rewards = -kl_coef * (old - ref) * completion_mask
        last = (completion_mask.sum(-1) - 1).long()
        rewards[torch.arange(len(texts)), last] += scores
        values = values * completion_mask
        advantages, returns = advantages_and_returns(rewards, values, completion_mask, gamma, lam)
        tokens = completion_mask.sum()
        mean = (advantages * completion_mask).sum() / tokens
        variance = (((advantages - mean) * completion_mask) ** 2).sum() / tokens
        advantages = (advantages - mean) * torch.rsqrt(variance + 1e-8) * completion_mask
        for _ in range(epochs):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            for r in rows:
                logps = completion_logps(policy, ids[r], mask[r], positions[r], width)
                ratio = torch.exp(logps - old[r])
                surrogate = torch.maximum(-advantages[r] * ratio, -advantages[r] * ratio.clamp(1 - clip, 1 + clip))
                ((surrogate * completion_mask[r]).sum() / tokens).backward()
                new_values = completion_values(critic, ids[r], mask[r], positions[r], width)
                clipped = values[r] + (new_values - values[r]).clamp(-value_clip, value_clip)
                value_loss = 0.5 * torch.maximum((new_values - returns[r]) ** 2, (clipped - returns[r]) ** 2)
                (vf_coef * (value_loss * completion_mask[r]).sum() / tokens).backward()
            for model, optimizer in zip((policy, critic), optimizers):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
        clock.step()
        scores_per_step.append(scores.mean().item())
        lengths_per_step.append(completion_mask.sum(-1).mean().item())
    return {"rewards": scores_per_step, "completion_lengths": lengths_per_step, "generation_seconds": generation_seconds}
