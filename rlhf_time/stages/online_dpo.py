"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): DPO on pairs the policy
samples itself, judged by the run's rewards.

One loop step: sample 2 completions per prompt from the current policy (the shared experience path), score them
with the reward functions and/or reward model of the `rollout` section, make the higher-scored one chosen and the
other rejected (ties are left out and counted), then one optimiser step of the DPO loss (`dpo.loss_type`,
`dpo.beta`, `dpo.label_smoothing`) against the reference, the initial policy (a frozen copy; with LoRA the
adapter-disabled policy). Log-probs are those of the sampling distribution, log softmax(logits / temperature),
summed over each completion's tokens (the end-of-turn token included).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import create_loss, dpo_implicit_rewards
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.stages.dpo_options import REFERENCE_FREE
from rlhf_time.stages.on_policy import PromptTrainer


class OnlineDPOTrainer(PromptTrainer):
    """OnlineDPOTrainer(config, reward_funcs=[fn, "exact_match", "pkg.mod:fn"]): the judge is the run's rewards."""

    def __init__(self, config, reward_funcs=None, *, tools=None, environment=None) -> None:
        options = config.dpo
        if options.loss_type in REFERENCE_FREE or options.ref_model or options.precompute_ref_logps:
            raise RlhfTimeError("stage online_dpo trains against the initial policy with dpo.loss_type sigmoid, ipo or "
                                "hinge: dpo.ref_model, dpo.precompute_ref_logps and the reference-free loss types do "
                                "not apply")
        super().__init__(config, reward_funcs, tools=tools, environment=environment)
        self.dpo_loss = create_loss("dpo", beta=options.beta, loss_type=options.loss_type,
                                    label_smoothing=options.label_smoothing, reduction="none")

    # ------------------------------------------------------------------------------------- experience
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """Two samples per prompt, scored; the pair's winner, its tie flag and both reference log-probs."""
        prepared, totals = [], torch.zeros(5, dtype=torch.float64, device=self.device)
        for experience in self.collect_experience(micro_batches, dataset, group_size=2):
            batch = experience.batch()
            scores = experience.rewards.to(self.device).view(-1, 2)  # (P, 2): each prompt's two samples
            batch["first_wins"] = scores[:, 0] > scores[:, 1]
            batch["kept"] = scores[:, 0] != scores[:, 1]
            batch["ref_logps"] = (self.reference_logps(batch) * batch["loss_mask"]).sum(-1)  # (2P,)
            chosen = torch.where(batch["first_wins"], scores[:, 0], scores[:, 1])
            rejected = torch.where(batch["first_wins"], scores[:, 1], scores[:, 0])
            kept = batch["kept"].double()
            totals += torch.stack([kept.sum(), torch.tensor(float(kept.numel()), device=self.device),
                                   (chosen * kept).sum(), (rejected * kept).sum(), ((chosen - rejected) * kept).sum()])
            prepared.append(batch)
        kept, pairs, chosen, rejected, margin = all_reduce_sum(totals).tolist()
        self.record_metrics({"train/online_dpo/ties": 1.0 - kept / max(pairs, 1.0),
                             "train/online_dpo/chosen_score": chosen / max(kept, 1.0),
                             "train/online_dpo/rejected_score": rejected / max(kept, 1.0),
                             "train/online_dpo/score_margin": margin / max(kept, 1.0)})
        return prepared

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["kept"].sum())  # pairs that are not ties

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        logps = (self.completion_logps(model, batch) * batch["loss_mask"]).sum(-1)  # (2P,)
        first_wins, kept = batch["first_wins"], batch["kept"]
        chosen, rejected = _ordered(logps, first_wins)
        ref_chosen, ref_rejected = _ordered(batch["ref_logps"], first_wins)
        per_pair = self.dpo_loss(chosen, rejected, ref_chosen, ref_rejected) * kept  # ties: no gradient
        reward_chosen, reward_rejected = dpo_implicit_rewards(chosen, rejected, ref_chosen, ref_rejected,
                                                              self.config.dpo.beta)
        keep = kept.float()
        metrics = {"rewards/chosen": (reward_chosen * keep).sum(), "rewards/rejected": (reward_rejected * keep).sum(),
                   "rewards/accuracies": ((reward_chosen > reward_rejected).float() * keep).sum(),
                   "rewards/margins": ((reward_chosen - reward_rejected) * keep).sum(),
                   "logps/chosen": (chosen.detach() * keep).sum(), "logps/rejected": (rejected.detach() * keep).sum()}
        return per_pair.sum() / max(num_items, 1), metrics


def _ordered(values: torch.Tensor, first_wins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) of each pair from per-row values (2P,) laid out first sample, second sample, ..."""
    first, second = values[0::2], values[1::2]
    return torch.where(first_wins, first, second), torch.where(first_wins, second, first)
