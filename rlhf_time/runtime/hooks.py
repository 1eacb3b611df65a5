"""The stage contract: what a stage declares, the public hooks the loop calls, and the helpers a stage may call.

`Trainer` (rlhf_time.runtime.loop) inherits these defaults; a stage overrides the hooks it needs and never a
private method of the loop. docs/stages.md ("Writing a stage") describes the contract with a complete stage.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from rlhf_time.data import load_dataset_of_kind
from rlhf_time.data.streaming import StreamedBatches
from rlhf_time.loss import chunked_sequence_logps, sequence_logps
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import AuxiliaryModel


class StageHooks:
    """Class attributes a stage sets, hooks it fills, helpers it calls (self.config, self.model, ... are the loop's)."""

    data_kind = "conversation"  # what its data files hold: "conversation" (SFT records) or "preference" (pairs)
    model_head = "causal_lm"  # the policy's head: "causal_lm" or "reward" (1-label sequence classification)
    default_metric_for_best_model = "eval_loss"  # the eval metric that picks the best model unless the user names one

    @property
    def peft_task_type(self) -> str:
        return "SEQ_CLS" if self.model_head == "reward" else "CAUSAL_LM"

    # -------------------------------------------------------------------------------------- inference
    @property
    def inference(self):
        """predict / chat / score on the model being trained, laid out as in training (rlhf_time.inference)."""
        from rlhf_time.inference import InferenceModel

        return InferenceModel(self.model, self.tokenizer, self.config, self.family, head=self.model_head,
                              engine=self.sampling_engine)

    def predict(self, prompts: list[str], **generation: Any) -> list[str]:
        """Answer each prompt (single-turn); keyword overrides: max_new_tokens, do_sample, temperature, top_p, top_k."""
        return self.inference.predict(prompts, **generation)

    def chat(self, messages: list[dict[str, str]], **generation: Any) -> str:
        """The assistant's reply to a conversation of {"role", "content"} messages."""
        return self.inference.chat(messages, **generation)

    # ---------------------------------------------------------------------------- helpers for stages
    def final_hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(final hidden states (B, T, H), lm_head) of `model` -- or (logits (B, T, V), None) when its head cannot be
        applied outside forward: LoRA on lm_head, or FSDP (lm_head's weight is only a shard outside forward).

        Losses formed from hidden states project only target positions, a chunk at a time: never (B, T, V) in fp32.
        """
        core = getattr(model, "module", model)  # DDP keeps the model in .module
        lm_head = core.get_output_embeddings()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if type(lm_head) is not nn.Linear or parallel.is_fsdp(core):
            return model(**inputs, use_cache=False).logits, None
        outputs = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return outputs.hidden_states[-1], lm_head

    def target_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probs of each row's labelled tokens (B,) (`labels` unshifted, -100 elsewhere), from the final
        hidden states a chunk of target positions at a time: a sequence's log-prob for DPO, KTO and their kin."""
        hidden, lm_head = self.final_hidden_states(model, batch)
        chunks = dict(chunk_size=self.config.loss_chunk_size, chunk_bytes=self.config.loss_chunk_bytes)
        if lm_head is None:  # `hidden` holds the logits
            return sequence_logps(hidden, batch["labels"], **chunks)
        return chunked_sequence_logps(hidden, lm_head.weight, batch["labels"], lm_head_bias=lm_head.bias, **chunks)

    def record_metrics(self, metrics: dict[str, float]) -> None:
        """Add stage metrics (already reduced over ranks) to this step's logged metrics, e.g. from prepare_step."""
        self._stage_metrics.update(metrics)

    def data_cache_dir(self) -> str:
        return self.config.data_cache_dir or str(self.config.run_dir.parent / ".cache")

    # -------------------------------------------------------------------------------------- stage hooks
    def auxiliary_models(self) -> list[AuxiliaryModel]:
        """The frozen models this stage needs besides the policy (built once into `self.aux[name]`)."""
        return []

    def load_dataset(self, path: str, max_samples: Optional[int]):
        """The tokenised data set of `path`, of this stage's data_kind (cached under data_cache_dir); with
        streaming, the train data as this rank's endless stream of micro-batches."""
        if self.config.streaming and path.role == "train":
            return StreamedBatches(self.data_kind, path, self.tokenizer, self.config, rank=self.dist.rank,
                                   world_size=self.dist.world_size, max_samples=max_samples)
        return load_dataset_of_kind(self.data_kind, path, self.tokenizer, self.config, cache_dir=self.data_cache_dir(),
                                    max_samples=max_samples)

    def collate(self, indices: list[int], dataset) -> dict[str, torch.Tensor]:
        """The micro-batch (tensors) of these example indices of `dataset` (the train or eval set, one passed to
        evaluate(), or a streamed micro-batch's list of examples)."""
        raise NotImplementedError

    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]], dataset) -> list[dict[str, torch.Tensor]]:
        """Turn a step's collated micro-batches (of `dataset`, the train set) into what the loss trains on, before
        their items are counted.

        Runs once per loop step on this rank's micro-batches: on-policy stages generate, score and compute
        advantages or reference log-probs here, so the step's loss is still divided by the items of the whole step
        (all micro-batches, all ranks). Default: the batches as collated.
        """
        return micro_batches

    def update(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """How one loop step updates the model. Default: one optimiser step; stages that reuse one prepared batch
        (several epochs or mini-batches over a rollout) call self.optimizer_step several times and return the
        metrics to log (and set optimizer_steps_per_update to match)."""
        return self.optimizer_step(micro_batches)

    def optimizer_steps_per_update(self) -> int:
        """Optimiser (and scheduler) steps each `update` takes; the schedule spans total_steps x this."""
        return 1

    def stage_state(self) -> Optional[dict[str, Any]]:
        """The stage's own trained state to checkpoint besides the policy (e.g. a critic and its optimizer):
        tensors and plain values, saved as stage_state.pt. Called on every rank. Default: none."""
        return None

    def load_stage_state(self, state: dict[str, Any]) -> None:
        """Restore what stage_state() returned, when resuming from a checkpoint."""

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss items (target tokens, pairs) a batch holds; the step loss is divided by their sum."""
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], num_items: int):
        """(loss already divided by num_items, {metric name: summed value}) for one micro-batch."""
        raise NotImplementedError

    def reduce_train_metric(self, name: str, total: float, num_items: int) -> float:
        """Turn a summed training metric into the logged value (default: per item)."""
        return total / max(1, num_items)

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """Sums over one eval batch of `dataset` (added over batches and ranks, then given to eval_metrics)."""
        raise NotImplementedError

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError
