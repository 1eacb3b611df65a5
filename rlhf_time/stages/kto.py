"""KTO (Ethayarajh et al. 2024): the policy against a frozen reference on completions labelled desirable or
undesirable, with no pairs needed (preference pairs give one example of each).

Each example's implied reward is r = log pi(y|x) - log pi_ref(y|x), summed over its completion tokens. The loss
compares r with the reference point z_ref, an estimate of KL(pi || pi_ref) from mismatched pairs (x_i, y_{i-1}):
each prompt with the completion of the example before it in the data set (as TRL's KTOTrainer pairs them, by
shifting the completions by one within the batch; a streamed micro-batch shifts within itself). z_ref is taken
over the whole optimiser step, every micro-batch and every rank, before the step's first loss, so accumulation and
DDP leave it unchanged. The reference is the initial policy, kept as DPO keeps it (a frozen copy, the model with its
LoRA adapters disabled, or log-probs precomputed before training).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data import PaddingCollator
from rlhf_time.data.tokenize import truncate
from rlhf_time.errors import RlhfTimeError
from rlhf_time.loss import create_loss, kto_kl_estimate
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.runtime.distributed import all_reduce_sum
from rlhf_time.runtime.loop import Trainer

KL_KEYS = ("kl_input_ids", "kl_attention_mask", "kl_labels")


class KTOTrainer(Trainer):
    """loss = mean over the step's examples of KTO's per-example loss (rlhf_time.loss.kto_loss)."""

    data_kind = "unpaired"
    model_head = "causal_lm"

    def __init__(self, config) -> None:
        super().__init__(config)
        options = config.kto
        self.kto_loss = create_loss("kto", beta=options.beta, desirable_weight=options.desirable_weight,
                                    undesirable_weight=options.undesirable_weight, loss_type=options.loss_type,
                                    reduction="none")
        self._warn_if_one_kind()
        self._step_kl = torch.zeros(())  # z_ref of the current step (all micro-batches, all ranks)
        self._step_counts = (1.0, 1.0)  # desirable, undesirable examples of the current step, all ranks
        self._precomputed: dict[str, torch.Tensor] = {}  # "train" / "eval" -> (N, 2): completion, mismatched pair
        if options.precompute_ref_logps:
            # Before any update the policy IS the reference: no copy is made at all.
            for role, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None and hasattr(dataset, "__len__"):
                    self._precomputed[role] = self._reference_logps_of(dataset)

    def _warn_if_one_kind(self) -> None:
        stats = getattr(self.train_dataset, "stats", None)
        if stats is not None and stats.examples and not (stats.desirable and stats.undesirable):
            missing = "undesirable" if stats.desirable else "desirable"
            self._log(f"warning: the train data has no {missing} examples (label "
                      f"{'false' if missing == 'undesirable' else 'true'}): KTO trains on one kind only")

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        """As DPO: `kto.ref_model`, else a frozen copy of the initial policy unless LoRA or precomputed log-probs
        make a copy unnecessary."""
        if self.config.kto.ref_model:
            return [AuxiliaryModel("reference", source=self.config.kto.ref_model, field="kto.ref_model",
                                   same_vocabulary=True)]
        if self.config.kto.precompute_ref_logps or self.config.use_lora:
            return []
        return [AuxiliaryModel("reference")]

    @property
    def reference(self) -> Optional[nn.Module]:
        return self.aux.get("reference")

    @property
    def uses_kl(self) -> bool:
        return self.config.kto.loss_type == "kto"

    # -------------------------------------------------------------------------------------------- data
    @property
    def collator(self) -> PaddingCollator:
        if not hasattr(self, "_collator"):
            self._collator = PaddingCollator(pad_token_id=self.tokenizer.pad_token_id)
        return self._collator

    def collate(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels, "desirable" (B,) bool, and (for the KL estimate) the mismatched
        rows kl_input_ids / kl_attention_mask / kl_labels: each prompt with the previous example's completion."""
        examples = [dataset[i] for i in indices]
        batch = self.collator(examples)
        batch["desirable"] = torch.tensor([float(e["label"]) > 0.5 for e in examples], dtype=torch.bool)
        if self.uses_kl:
            partners = [dataset[(i - 1) % len(dataset)] for i in indices]
            rows = [mismatched(e, p, self.config.max_seq_length) for e, p in zip(examples, partners)]
            kl = self.collator.pad([ids for ids, _ in rows], [labels for _, labels in rows])
            batch.update({f"kl_{key}": value for key, value in kl.items()})
        role = "train" if dataset is self.train_dataset else "eval" if dataset is self.eval_dataset else None
        if role in getattr(self, "_precomputed", {}):  # (empty while _reference_logps_of is filling it)
            reference = self._precomputed[role][indices]  # (B, 2)
            batch["ref_logps"], batch["ref_kl_logps"] = reference[:, 0], reference[:, 1]
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["desirable"].numel()  # examples

    # ----------------------------------------------------------------------------------------- log-probs
    def sequence_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Summed log-probs of the completion tokens of each row (B,); prefix "kl_" reads the mismatched rows."""
        return self.target_logps(model, {key: batch[prefix + key] for key in ("input_ids", "attention_mask", "labels")})

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Log-probs (B,) under the reference: precomputed, the frozen copy, or the model with LoRA disabled."""
        precomputed = "ref_kl_logps" if prefix else "ref_logps"
        if precomputed in batch:
            return batch[precomputed]
        if self.reference is not None:
            return self.sequence_logps(self.reference, batch, prefix)
        if self.config.use_lora:  # the base model is the reference
            with self.model.disable_adapter():
                return self.sequence_logps(self.model, batch, prefix)
        raise RlhfTimeError("kto.precompute_ref_logps=true keeps reference log-probs for train_file and eval_file "
                            "only (no reference model is kept); set it to false to evaluate other data")

    @torch.no_grad()
    def _reference_logps_of(self, dataset) -> torch.Tensor:
        """(N, 2) reference log-probs of a whole data set (each completion, each mismatched pair), from the
        still-untrained policy (LoRA: adapters off)."""
        batch_size = self.config.eval_batch_size or self.config.batch_size
        model, columns = self.model, []
        was_training = model.training
        model.eval()
        for start in range(0, len(dataset), batch_size):
            batch = self.collate(list(range(start, min(start + batch_size, len(dataset)))), dataset)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast(), (model.disable_adapter() if self.config.use_lora else contextlib.nullcontext()):
                matched = self.sequence_logps(model, batch).float().cpu()
                kl = (self.sequence_logps(model, batch, "kl_").float().cpu() if self.uses_kl
                      else torch.zeros_like(matched))
            columns.append(torch.stack([matched, kl], dim=1))
        model.train(was_training)
        return torch.cat(columns)

    def _kl_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the batch's mismatched rows of log pi - log pi_ref, their count), without gradients."""
        with torch.no_grad():
            policy = self.sequence_logps(model, batch, "kl_").float()
            reference = self.reference_logps(batch, "kl_").float()
        return (policy - reference).sum(), torch.tensor(float(policy.numel()), device=policy.device)

    # -------------------------------------------------------------------------------------------- loss
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """Before the step's first loss: z_ref over all its micro-batches and ranks, and its example counts."""
        desirable = sum(int(b["desirable"].sum()) for b in micro_batches)
        examples = sum(b["desirable"].numel() for b in micro_batches)
        totals = torch.tensor([0.0, 0.0, float(desirable), float(examples - desirable)], device=self.device,
                              dtype=torch.float64)
        if self.uses_kl:
            with self._autocast():
                for batch in micro_batches:
                    kl_sum, count = self._kl_sums(self.model, {k: v.to(self.device) for k, v in batch.items()})
                    totals[0] += kl_sum.double()
                    totals[1] += count.double()
        totals = all_reduce_sum(totals)
        self._step_kl = kto_kl_estimate(totals[0], totals[1]) if self.uses_kl else totals.new_zeros(())
        self._step_counts = (float(totals[2]), float(totals[3]))
        self.record_metrics({"train/kl": float(self._step_kl)})
        return micro_batches

    def _example_terms(self, model: nn.Module, batch: dict[str, torch.Tensor], kl: torch.Tensor):
        """(per-example loss (B,), summed metrics) of a batch, with reference point `kl`."""
        policy = self.sequence_logps(model, batch)
        reference = self.reference_logps(batch)
        desirable = batch["desirable"]
        per_example = self.kto_loss(policy, reference, desirable, kl.to(policy.device))
        rewards = self.config.kto.beta * (policy.detach().float() - reference.float())
        good, bad = desirable.float(), (~desirable).float()
        metrics = {"rewards/chosen": (rewards * good).sum(), "rewards/rejected": (rewards * bad).sum(),
                   "logps/chosen": (policy.detach().float() * good).sum(),
                   "logps/rejected": (policy.detach().float() * bad).sum()}
        return per_example, metrics

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        per_example, metrics = self._example_terms(model, batch, self._step_kl)
        return per_example.sum() / num_items, metrics

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        """rewards/logps of chosen (desirable) examples per desirable example of the step; rejected likewise."""
        desirable, undesirable = self._step_counts
        if name.endswith("/chosen"):
            return total / max(desirable, 1.0)
        if name.endswith("/rejected"):
            return total / max(undesirable, 1.0)
        return super().reduce_train_metric(name, total, num_items)

    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step; a step without desirable (undesirable) examples logs no chosen (rejected) values,
        and rewards/margins only when it has both, as TRL does."""
        metrics = super().update(micro_batches)
        desirable, undesirable = self._step_counts
        for side, count in (("chosen", desirable), ("rejected", undesirable)):
            if not count:
                metrics.pop(f"train/rewards/{side}", None)
                metrics.pop(f"train/logps/{side}", None)
        if desirable and undesirable:
            metrics["train/rewards/margins"] = metrics["train/rewards/chosen"] - metrics["train/rewards/rejected"]
        return metrics

    # --------------------------------------------------------------------------------------- evaluation
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """Sums over one eval batch; its z_ref comes from the batch's own mismatched rows."""
        device = batch["desirable"].device
        kl = kto_kl_estimate(*self._kl_sums(model, batch)) if self.uses_kl else torch.zeros((), device=device)
        per_example, metrics = self._example_terms(model, batch, kl)
        examples = float(per_example.numel())
        desirable = float(batch["desirable"].sum())
        return {"loss_sum": per_example.sum(), "examples": torch.tensor(examples, device=device),
                "desirable": torch.tensor(desirable, device=device),
                "undesirable": torch.tensor(examples - desirable, device=device),
                "kl_sum": kl.double() * examples, **metrics}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        examples = max(totals.pop("examples", 0.0), 1.0)
        desirable, undesirable = totals.pop("desirable", 0.0), totals.pop("undesirable", 0.0)
        metrics = {"eval_loss": totals.pop("loss_sum", 0.0) / examples, "eval_kl": totals.pop("kl_sum", 0.0) / examples}
        for side, count in (("chosen", desirable), ("rejected", undesirable)):
            if count:
                for kind in ("rewards", "logps"):
                    metrics[f"eval_{kind}/{side}"] = totals[f"{kind}/{side}"] / count
        if desirable and undesirable:
            metrics["eval_rewards/margins"] = metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"]
        return metrics


def mismatched(example: dict, partner: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of example's prompt followed by partner's completion (the partner's tokens from its
    first target on, trained as in the partner), cut to max_length keeping the completion's start."""
    prompt_end = first_target(example["labels"])
    start = first_target(partner["labels"])
    input_ids = list(example["input_ids"][:prompt_end]) + list(partner["input_ids"][start:])
    labels = [IGNORE_INDEX] * prompt_end + list(partner["labels"][start:])
    input_ids, labels, _ = truncate(input_ids, labels, max_length)
    return input_ids, labels


def first_target(labels) -> int:
    """Position of the first trained token (the completion's start); at least 1 (position 0 predicts nothing)."""
    return max(1, next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels)))
