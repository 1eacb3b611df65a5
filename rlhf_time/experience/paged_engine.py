"""A second sampling engine: transformers' own continuous batching (a paged KV cache), `rollout.engine:
transformers_paged`.

transformers draws the tokens (its temperature / top-k / top-p warpers, its paged attention cache, its scheduler);
the log-probs and entropies are then recomputed by one forward of the policy over prompt + completion, in eval
mode and without gradients. Recomputed, because what transformers can return is the log-prob under the
distribution *after* top-k / top-p renormalisation and no entropy at all, while the loss differentiates
log softmax(logits / temperature) over the whole vocabulary (see experience.sampler). The recomputed log-probs are
the policy's own, so there is no sampler/trainer mismatch for an importance-sampling correction to fix.

Same seed, same completions: the requests are queued before transformers' generation thread starts, so its
scheduler sees one fixed workload and draws from one seeded RNG in one order (`generate_batch` starts the thread
first and adds the requests while it runs, so what its first batches hold depends on thread timing). The seed is
drawn from the caller's generator, a pure function of (seed, step, rank, micro-batch) in training: exact resume.
The process's global RNG, which transformers reseeds, is restored afterwards.

The model's attention implementation (eager becomes paged|eager while sampling; a half-precision model may be
switched to flash attention) and its training mode are restored before `sample` returns, so the training forward
that follows is the one it would have been.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from rlhf_time.experience.sampler import Rollout, SamplingParams

PAGE_SIZE = 32  # tokens per cache page: rollouts are short, and a page is the granularity of wasted cache
MAX_BATCH_TOKENS = 8192  # most tokens in one forward (transformers' own default)
RECOMPUTE_LOGITS_BYTES = 1 << 28  # logits held at once by the log-prob forward (rows are chunked to fit)


class TransformersPagedEngine:
    """Sampling by transformers' continuous batching on the model being trained, in this process."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def sample(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, num_samples: int = 1,
               generator: Optional[torch.Generator] = None) -> Rollout:
        if not params.stop_early:
            raise ValueError("rollout.engine transformers_paged cannot run every row to max_new_tokens "
                             "(stop_early=False, FSDP); use rollout.engine kv_cache")
        prompts = [list(p) for p in prompts]
        device = next(self.model.parameters()).device
        # From the caller's generator, or else from the global RNG (advanced here, outside the fork below, so two
        # calls without a generator draw different samples).
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator is not None else "cpu"))
        was_training = self.model.training
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                completions = _generate(self.model, prompts, params, num_samples, seed)
            self.model.eval()
            return _recomputed_rollout(self.model, prompts, completions, params, num_samples, device)
        finally:
            self.model.train(was_training)


def _generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams, num_samples: int,
              seed: int) -> list[list[int]]:
    """num_samples completions of each prompt (token ids, the stop token kept), rows i*G .. i*G+G-1 for prompt i."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Greedy: a prompt's G completions are one completion, copied (transformers refuses greedy with G > 1).
    per_prompt, copies = (num_samples, 1) if params.do_sample else (1, num_samples)
    sampling = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p) if params.do_sample else {}
    generation = GenerationConfig(do_sample=params.do_sample, max_new_tokens=params.max_new_tokens,
                                  eos_token_id=list(params.stop_token_ids) or None, pad_token_id=params.pad_token_id,
                                  num_return_sequences=per_prompt, **sampling)
    # The cache is sized to this workload, never to the free device memory (transformers' default, which would
    # take the memory training needs, or on CPU most of the host's RAM).
    pages = sum(math.ceil((len(p) + params.max_new_tokens) / PAGE_SIZE) for p in prompts) * per_prompt
    batching = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=pages, seed=seed,
                                        max_batch_tokens=min(MAX_BATCH_TOKENS, sum(map(len, prompts)) + len(prompts) * per_prompt),
                                        drop_unsupported_processors=False)  # a warper dropped would change the policy
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
    try:
        request_ids = manager.add_requests(inputs=prompts, max_new_tokens=params.max_new_tokens)
        manager.start()
        wanted = {rid: [f"{rid}__child#{k}" for k in range(per_prompt - 1)] + [rid] for rid in request_ids}
        outputs = {}
        while len(outputs) < len(prompts) * per_prompt:
            output = manager.get_result(timeout=1)
            if output is None and not manager.is_running():
                break
            if output is not None and output.is_finished():
                outputs[output.request_id] = output
    finally:
        manager.stop(block=True)  # also restores the attention implementation
        manager.destroy()
    failed = [rid for rows in wanted.values() for rid in rows if rid not in outputs or outputs[rid].error is not None]
    if failed:
        error = manager.background_thread_status.fatal_error or next(
            (outputs[rid].error for rid in failed if rid in outputs), "no result")
        raise RuntimeError(f"transformers continuous batching failed for {len(failed)} completions: {error}")
    return [list(outputs[rid].generated_tokens) for parent in request_ids for rid in wanted[parent] for _ in range(copies)]


@torch.no_grad()
def _recomputed_rollout(model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        params: SamplingParams, num_samples: int, device) -> Rollout:
    """The Rollout layout of experience.sampler (prompt left-padded, completion right-padded), with log-probs and
    entropies of log softmax(logits / temperature) from one forward (greedy: temperature 1, as KVCacheEngine)."""
    rows = [p for p in prompts for _ in range(num_samples)]
    prompt_length, width = max(map(len, rows)), max(map(len, completions))
    pad = params.pad_token_id
    input_ids = torch.tensor([[pad] * (prompt_length - len(p)) + p + c + [pad] * (width - len(c))
                              for p, c in zip(rows, completions)], device=device)
    attention_mask = torch.tensor([[0] * (prompt_length - len(p)) + [1] * (len(p) + len(c)) + [0] * (width - len(c))
                                   for p, c in zip(rows, completions)], device=device)
    completion_mask = attention_mask[:, prompt_length:].bool()  # (N, C)
    temperature = params.temperature if params.do_sample else 1.0
    logps = torch.zeros(len(rows), width, device=device)
    entropies = torch.zeros(len(rows), width, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, RECOMPUTE_LOGITS_BYTES // (4 * (width + 1) * vocab))
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        mask = attention_mask[part]
        logits = model(input_ids=input_ids[part], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=width + 1).logits  # (n, C + 1, V): the positions that predict a completion token
        log_probs = (logits[:, :-1].float() / temperature).log_softmax(-1)  # (n, C, V)
        logps[part] = log_probs.gather(-1, input_ids[part, prompt_length:, None]).squeeze(-1)
        entropies[part] = -(log_probs.exp() * log_probs).nan_to_num().sum(-1)
    stops = torch.tensor(sorted(set(params.stop_token_ids)), device=device, dtype=torch.long)
    ended = (torch.isin(input_ids[:, prompt_length:], stops) & completion_mask).any(-1)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_length=prompt_length,
                   completion_mask=completion_mask, truncated=~ended, logps=logps * completion_mask,
                   entropies=entropies * completion_mask)
