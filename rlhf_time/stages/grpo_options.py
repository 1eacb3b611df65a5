"""Options of stage grpo: the section `grpo` (sampling and rewards: the shared section `rollout`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import model_validator

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
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = option(
        "grpo", "grpo: (r - group mean) / scale (Shao et al. 2024); rloo: r - mean of the group's other rewards "
                "(Ahmadian et al. 2024), with scale_rewards none unless set; reinforce_pp: REINFORCE++ (Hu 2025), "
                "kl_coef x KL folded into each token's reward, returns whitened over the whole step; "
                "reinforce_pp_baseline: the same on rewards minus their group mean.")
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token", "token: one ratio per token (GRPO); sequence: one ratio per completion, exp(mean_t log-ratio), "
                 "clipped and given to each of its tokens (GSPO, Zheng et al. 2025).")
    tis_cap: Optional[float] = option(
        None, "Truncated importance sampling (Yao et al. 2025): each token's loss x min(pi_train / pi_sampler, "
              "tis_cap), detached; None = off. Needs num_iterations 1.", gt=1)

    @model_validator(mode="before")
    @classmethod
    def _rloo_scale(cls, values: Any) -> Any:
        """RLOO's advantage is not divided by a std unless scale_rewards is set: the default follows the estimator."""
        if isinstance(values, dict) and values.get("advantage_estimator") == "rloo" and "scale_rewards" not in values:
            return {**values, "scale_rewards": "none"}
        return values

    @model_validator(mode="after")
    def _tis_on_policy(self) -> "GRPOOptions":
        if self.tis_cap is not None and self.num_iterations > 1:
            raise ValueError("tis_cap needs num_iterations 1: with more, the ratio to the sampling log-probs already "
                             "corrects (and clips) the sampler mismatch")
        return self
