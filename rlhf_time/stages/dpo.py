"""Direct Preference Optimisation: the policy against a frozen reference, on preference pairs; and the
reference-free ORPO and SimPO (`dpo.loss_type: orpo | simpo`) on the same data and batches.

The reference is the initial policy: with LoRA, the same model with its adapters disabled (no second copy in
memory); otherwise a frozen copy, or no copy at all when `precompute_ref_logps` computes the reference
log-probs of the train and eval sets up front. ORPO and SimPO load no reference at all. Log-probs are summed over
completion tokens only (ORPO / SimPO: averaged over them), computed from the final hidden states chunk by chunk
(never the full float32 logits).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import create_loss, dpo_implicit_rewards
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.stages.dpo_options import REFERENCE_FREE
from rlhf_time.stages.preference import PreferenceTrainer


class DPOTrainer(PreferenceTrainer):
    """loss = dpo(policy log-probs, reference log-probs) [+ rpo_alpha * NLL of the chosen reply]."""

    model_head = "causal_lm"

    def __init__(self, config) -> None:
        super().__init__(config)
        options = config.dpo
        if options.loss_type == "orpo":
            self.dpo_loss = create_loss("orpo", reduction="none")
        elif options.loss_type == "simpo":
            self.dpo_loss = create_loss("simpo", beta=options.beta, gamma=options.simpo_gamma,
                                        label_smoothing=options.label_smoothing, reduction="none")
        else:
            self.dpo_loss = create_loss("dpo", beta=options.beta, loss_type=options.loss_type,
                                        label_smoothing=options.label_smoothing, reduction="none")
        if self.reference_free:
            self._log(f"dpo.loss_type={options.loss_type}: reference-free, no reference model is loaded")
        self._step_chosen_tokens = 1.0  # chosen-reply target tokens of the step, all ranks (ORPO / SimPO's NLL)
        self._precomputed: dict[str, torch.Tensor] = {}  # "train" / "eval" -> (N, 2) reference log-probs
        if config.dpo.precompute_ref_logps:
            # Before any update the policy IS the reference: no copy is made at all.
            for role, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None:
                    self._precomputed[role] = self._reference_logps_of(dataset)

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        """The reference is `ref_model` when given, else the initial policy: a frozen copy, unless LoRA (the policy
        with adapters disabled is the reference) or precomputed log-probs make a copy unnecessary."""
        if self.config.dpo.ref_model:
            return [AuxiliaryModel("reference", source=self.config.dpo.ref_model, field="dpo.ref_model",
                                   same_vocabulary=True)]
        if self.reference_free or self.config.dpo.precompute_ref_logps or self.config.use_lora:
            return []
        return [AuxiliaryModel("reference")]

    @property
    def reference_free(self) -> bool:
        return self.config.dpo.loss_type in REFERENCE_FREE

    @property
    def reference(self) -> Optional[nn.Module]:
        """The frozen copy of the initial policy, or None when no copy is kept."""
        return self.aux.get("reference")

    # -------------------------------------------------------------------------------------------- data
    def collate(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        batch = super().collate(indices, dataset)
        role = "train" if dataset is self.train_dataset else "eval" if dataset is self.eval_dataset else None
        if role in getattr(self, "_precomputed", {}):  # (empty while _reference_logps_of is filling it)
            reference = self._precomputed[role][indices]  # (B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference[:, 0], reference[:, 1]
        return batch

    # ----------------------------------------------------------------------------------------- log-probs
    def sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probs of the completion tokens of every row of the stacked (2B, T) batch, (2B,)."""
        return self.target_logps(model, batch)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs (B,) under the reference: precomputed, the frozen copy, or LoRA disabled."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is not None:
            logps = self.sequence_logps(self.reference, batch)
        elif self.config.use_lora:  # the base model is the reference
            with self.model.disable_adapter():
                logps = self.sequence_logps(self.model, batch)
        else:
            raise RlhfTimeError("dpo.precompute_ref_logps=true keeps reference log-probs for train_file and eval_file "
                                "only (no reference model is kept); set it to false to evaluate other data")
        pairs = batch["margin"].numel()
        return logps[:pairs], logps[pairs:]

    @torch.no_grad()
    def _reference_logps_of(self, dataset) -> torch.Tensor:
        """(N, 2) reference log-probs of a whole data set, from the still-untrained policy (LoRA: adapters off)."""
        batch_size = self.config.eval_batch_size or self.config.batch_size
        model, columns = self.model, []
        was_training = model.training
        model.eval()
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(self.device) for k, v in self.collate(indices, dataset).items()}
            with self._autocast(), (model.disable_adapter() if self.config.use_lora else contextlib.nullcontext()):
                logps = self.sequence_logps(model, batch).float().cpu()  # (2B,)
            columns.append(torch.stack(logps.chunk(2), dim=1))  # (B, 2): chosen, rejected
        model.train(was_training)
        return torch.cat(columns)

    # -------------------------------------------------------------------------------------------- loss
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """ORPO / SimPO with an NLL term: count the step's chosen-reply target tokens (all micro-batches, all ranks),
        which normalise that term as TRL's token mean does for one batch."""
        if self.reference_free:
            self._step_chosen_tokens = float(all_reduce_sum(torch.tensor(
                float(sum(int(_chosen_tokens(b).sum()) for b in micro_batches)), device=self.device)))
        return micro_batches

    def _pair_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(per-pair loss (B,), the chosen replies' summed NLL (a scalar, 0 without an NLL term), summed metrics)."""
        logps = self.sequence_logps(model, batch)
        pairs = batch["margin"].numel()
        chosen, rejected = logps[:pairs], logps[pairs:]
        if self.reference_free:
            return self._reference_free_terms(batch, chosen, rejected)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        per_pair = self.dpo_loss(chosen, rejected, ref_chosen, ref_rejected)  # (B,)
        if self.config.dpo.rpo_alpha:
            # NLL of the chosen reply, per token of that reply (RPO, Pang et al. 2024)
            chosen_tokens = _chosen_tokens(batch).clamp(min=1)
            per_pair = per_pair + self.config.dpo.rpo_alpha * (-chosen / chosen_tokens)
        reward_chosen, reward_rejected = dpo_implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.config.dpo.beta)
        return per_pair, chosen.new_zeros(()), _pair_metrics(reward_chosen, reward_rejected, chosen, rejected)

    def _reference_free_terms(self, batch, chosen: torch.Tensor, rejected: torch.Tensor):
        """ORPO: lambda * loss_OR per pair, NLL(chosen); SimPO: its loss per pair, cpo_alpha * NLL(chosen).
        Rewards as TRL reports them: the weight (orpo_lambda / beta) times the length-averaged log-prob."""
        options, pairs = self.config.dpo, batch["margin"].numel()
        lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)  # (2B,)
        chosen_avg, rejected_avg = chosen / lengths[:pairs], rejected / lengths[pairs:]
        per_pair = self.dpo_loss(chosen_avg, rejected_avg)  # (B,)
        if options.loss_type == "orpo":
            per_pair, nll_weight, scale = options.orpo_lambda * per_pair, 1.0, options.orpo_lambda
        else:
            nll_weight, scale = options.cpo_alpha, options.beta
        nll = -chosen.sum() * nll_weight
        metrics = _pair_metrics(scale * chosen_avg.detach(), scale * rejected_avg.detach(), chosen_avg, rejected_avg)
        metrics["nll_loss"] = -chosen.detach().sum()
        return per_pair, nll, metrics

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        per_pair, nll, metrics = self._pair_terms(model, batch)
        return per_pair.sum() / num_items + nll / max(self._step_chosen_tokens, 1.0), metrics

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        if name == "nll_loss":  # per chosen-reply token of the step
            return total / max(self._step_chosen_tokens, 1.0)
        return super().reduce_train_metric(name, total, num_items)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        per_pair, nll, metrics = self._pair_terms(model, batch)
        device = per_pair.device
        return {"loss_sum": per_pair.sum(), "pairs": torch.tensor(float(per_pair.numel()), device=device),
                "nll_sum": nll.detach(), "chosen_tokens": _chosen_tokens(batch).sum().float(), **metrics}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = max(totals.pop("pairs", 0.0), 1.0)
        tokens = max(totals.pop("chosen_tokens", 0.0), 1.0)
        metrics = {"eval_loss": totals.pop("loss_sum", 0.0) / pairs + totals.pop("nll_sum", 0.0) / tokens}
        if "nll_loss" in totals:
            metrics["eval_nll_loss"] = totals.pop("nll_loss") / tokens
        metrics.update({f"eval_{name}": value / pairs for name, value in totals.items()})
        return metrics


def _chosen_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens of each chosen reply (B,): the shifted labels of the first B rows."""
    pairs = batch["margin"].numel()
    return (batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum(-1)


def _pair_metrics(reward_chosen, reward_rejected, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """Summed over the batch's pairs (the loop divides by the step's pairs)."""
    return {
        "rewards/chosen": reward_chosen.sum(),
        "rewards/rejected": reward_rejected.sum(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().sum(),
        "rewards/margins": (reward_chosen - reward_rejected).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }
