"""Knowledge distillation: the student (the policy) learns the teacher's next-token distributions.

loss = kd_alpha * CE(student, data) + (1 - kd_alpha) * KD(teacher || student), over the SFT targets (response tokens
and the end-of-turn token). The teacher is a frozen auxiliary model; both models' logits are formed from their
final hidden states a chunk of target positions at a time. With kd_on_policy_ratio > 0, that share of steps
trains on the student's own sampled replies, scored by the teacher (on-policy distillation, GKD).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from rlhf_time.constants import IGNORE_INDEX
from rlhf_time.data.tokenize import truncate
from rlhf_time.experience.sampler import SamplingParams, sampling_generator
from rlhf_time.loss import chunked_kd_loss
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.stages.sft import SFTrainer

# config.kd.loss_type -> the loss library's divergence names
KD_KINDS = {"forward": "forward_kl", "reverse": "reverse_kl", "jsd": "jsd"}


class KDTrainer(SFTrainer):
    """Distil `teacher_model` into the policy on SFT data (same masks, same batching as SFT)."""

    data_kind = "conversation"
    model_head = "causal_lm"

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        config = self.config
        return [AuxiliaryModel("teacher", source=config.kd.teacher_model, field="kd.teacher_model", adapter=config.kd.teacher_adapter,
                               same_vocabulary=True, cast_to_amp_dtype=True)]

    # ------------------------------------------------------------------------------------------- loss
    def kd_terms(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int | None, label_smoothing: float):
        student, student_head = self.final_hidden_states(model, batch)
        with torch.no_grad():
            teacher, teacher_head = self.final_hidden_states(self.aux["teacher"], batch)
        config = self.config
        return chunked_kd_loss(
            student, teacher, batch["labels"], student_head=student_head, teacher_head=teacher_head,
            vocab_size=len(self.tokenizer), alpha=config.kd.alpha, temperature=config.kd.temperature,
            kind=KD_KINDS[config.kd.loss_type], beta=config.kd.beta, label_smoothing=label_smoothing,
            num_items_in_batch=num_items, chunk_size=config.loss_chunk_size, chunk_bytes=config.loss_chunk_bytes,
        )

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        loss, sums = self.kd_terms(model, batch, num_items, self.config.label_smoothing)
        return loss, {"kd_loss": sums["kd"], "ce_loss": sums["ce"]}

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        _, sums = self.kd_terms(model, batch, None, 0.0)
        return {"loss_sum": sums["ce"], "kd_sum": sums["kd"], "correct": sums["correct"], "tokens": sums["tokens"]}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        metrics = super().eval_metrics(totals)  # eval_loss (the student's CE), perplexity, token accuracy
        metrics["eval_kd_loss"] = totals.get("kd_sum", 0.0) / max(totals.get("tokens", 0.0), 1.0)
        return metrics

    # -------------------------------------------------------------------------------- on-policy steps
    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """With probability kd_on_policy_ratio (the same draw on every rank, from seed and step), replace each
        example's reply by the student's own sample; the teacher then scores the student's tokens."""
        ratio = self.config.kd.on_policy_ratio
        on_policy = ratio > 0 and random.Random(f"{self.config.seed}:{self.global_step}").random() < ratio
        self.record_metrics({"train/on_policy": float(on_policy)})
        if not on_policy:
            return micro_batches
        return [self.student_rollout(batch, i) for i, batch in enumerate(micro_batches)]

    def student_rollout(self, batch: dict[str, torch.Tensor], micro_index: int = 0) -> dict[str, torch.Tensor]:
        """The batch's prompts (everything before each row's last reply) continued by the student through the one
        sampler (rlhf_time.experience.sampler; its RNG a pure function of seed, step, rank and micro-batch, so a
        resumed run samples what the uninterrupted one did); targets = the sampled tokens, up to and including the
        stop token."""
        config = self.config
        prompts = []
        for ids, labels, length in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                       batch["attention_mask"].sum(-1).tolist()):
            prompts.append(ids[: _last_reply_start(labels[:length])])
        room = config.max_seq_length - max(map(len, prompts))
        params = SamplingParams(max_new_tokens=max(1, min(config.max_new_tokens, room)),
                                pad_token_id=self.tokenizer.pad_token_id,
                                stop_token_ids=tuple(self.inference.stop_token_ids()), temperature=config.temperature,
                                top_p=config.top_p, top_k=config.top_k,
                                stop_early=not parallel.is_fsdp(self.model))  # FSDP ranks must run the same forwards
        generator = sampling_generator(config.seed, self.global_step, self.dist.rank, micro_index, self.device)
        with self._autocast():
            rollout = self.sampling_engine.sample(prompts, params, generator=generator)
        examples = []
        for prompt, completion in zip(prompts, rollout.completion_lists()):
            ids, labels, _ = truncate(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, config.max_seq_length)
            examples.append({"input_ids": ids, "labels": labels})
        return self.collator(examples)


def _last_reply_start(labels: list[int]) -> int:
    """Index of the first token of the last target span (the reply the student re-generates)."""
    start = len(labels)
    for index in range(len(labels) - 1, 0, -1):
        if labels[index] != IGNORE_INDEX:
            start = index
        elif start < len(labels):
            break
    return start


__all__ = ["KDTrainer", "KD_KINDS"]
