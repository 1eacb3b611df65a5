"""Options the on-policy stages share (grpo, ppo; kd's on-policy steps sample with them too): the section `rollout`.

Prompt and completion lengths, the sampling engine, the rewards (functions, weights, a reward-model folder) and the clip range of the
policy ratio. Sampling itself (temperature, top_p, top_k) uses the config's generation settings, shared with
predict and chat: one sampler, one set of knobs.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from rlhf_time.stages.section import Section, option


class RolloutOptions(Section):
    """rollout: how long prompts and completions are, and how completions are scored."""

    former_names: ClassVar[dict[str, str]] = {
        "max_prompt_length": "max_prompt_length", "max_completion_length": "max_completion_length",
        "reward_funcs": "reward_funcs", "reward_weights": "reward_weights", "reward_model": "reward_model",
        "epsilon": "epsilon", "epsilon_high": "epsilon_high"}

    max_prompt_length: int = option(512, "Prompt tokens kept (longer prompts are cut from the left, counted in the data summary).", gt=0)
    max_completion_length: int = option(256, "Most tokens sampled per completion (generation stops earlier at EOS/end-of-turn).", gt=0)
    engine: Literal["kv_cache", "transformers_paged"] = option(
        "kv_cache", "What samples the completions (and greedy eval / predict / chat during training): "
                              "transformers_paged (transformers' continuous batching with a paged cache, log-probs "
                              "recomputed by one forward) or kv_cache (rlhf_time's own batched sampler, the default: "
                              "2.9-4.2x transformers_paged's tokens/s with one CPU thread, docs/stages.md). Same layout, "
                              "log-probs and seeded determinism. "
                              "distributed fsdp always samples with kv_cache (its ranks must run the same forwards).")
    sample_together: bool = option(
        False, "Sample all gradient_accumulation_steps micro-batches of a step in one engine call (a sampling batch "
               "that many times larger, as TRL's generation batch), then train on them one micro-batch at a time (the "
               "same training memory). Off: each micro-batch is sampled on its own from its own seed, so one process "
               "with accumulation N draws exactly what N data-parallel ranks draw.")
    reward_funcs: list[str] = option([], "Reward functions: built-ins (exact_match, regex_match, length_penalty) or "
                                         "'package.module:function' / 'file.py:function'.")
    reward_weights: Optional[list[float]] = option(None, "One weight per reward (reward_funcs, then reward_model); None = all 1.")
    reward_model: Optional[str] = option(None, "Folder of a reward model trained with stage rm; its score is one more reward.")
    reward_concurrency: int = option(16, "async reward functions: calls in flight at most (all run on one event loop).",
                                     ge=1)
    reward_workers: int = option(1, "Threads for plain reward functions; 1 = called one after another (as before).",
                                 ge=1)
    reward_timeout: Optional[float] = option(None, "Seconds a reward call may take; a late call gives None for its "
                                                   "completions (see reward_on_error). None = no limit.", gt=0)
    reward_on_error: Literal["none", "stop"] = option(
        "none", "What a reward call past reward_timeout does: none (its rewards are None, one warning line) or stop "
                "(the run stops with one line). An exception in a reward function always stops the run.")
    max_tool_turns: int = option(4, "Multi-turn episodes (tools, environment): replies (tool results, environment "
                                    "messages) after which an episode ends; max_completion_length bounds the whole "
                                    "trajectory.", ge=0)
    tool_timeout: Optional[float] = option(30.0, "Seconds a tool call may take; a late call gives the model an "
                                                 "'error: ...' tool turn. None = no limit.", gt=0)
    environment: Optional[str] = option(None, "A multi-turn environment 'package.module:Class' / 'file.py:Class' "
                                              "with reset(record) and step(text) (see the docs); its rewards are one "
                                              "more reward, after reward_model.")
    epsilon: float = option(0.2, "Clip range of the policy ratio: [1 - epsilon, 1 + epsilon_high] (PPO, Schulman et al. 2017).", gt=0, lt=1)
    epsilon_high: Optional[float] = option(None, "Upper clip range (DAPO's clip-higher, Yu et al. 2025, uses 0.28); None = epsilon.", gt=0)
