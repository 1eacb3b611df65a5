"""Options of stage grpo: the section `grpo` (sampling and rewards: the shared section `rollout`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from rlhf_time.stages.section import Section, option


class GRPOOptions(Section):
    """grpo: group size, advantage scaling, loss aggregation and the KL term."""

    former_names: ClassVar[dict[str, str]] = {
        "kl_coef": "kl_coef", "num_generations": "num_generations", "num_iterations": "num_iterations",
        "scale_rewards": "scale_rewards",
        "grpo_loss_type": "loss_type", "mask_truncated_completions": "mask_truncated_completions"}

    num_generations: int = option(8, "Completions sampled per prompt (the group G); batch_size counts prompts.", ge=2)
    num_iterations: int = option(1, "Optimiser steps (mu) on each generated batch; 1 = purely on-policy.", gt=0)
    kl_coef: float = option(0.0, "Weight of the KL to the frozen reference policy (k3 estimator); 0 loads no reference at all.", ge=0)
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Advantage scale: (r - group mean) / (std of the group | std of the batch | 1, as Dr. GRPO) + 1e-4.")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = option(
        "dapo", "Loss aggregation: grpo (token mean per sequence), dr_grpo (token sum / max_completion_length), "
                "dapo (token mean over the step).")
    mask_truncated_completions: bool = option(False, "Leave completions that hit max_completion_length out of the loss (DAPO).")
