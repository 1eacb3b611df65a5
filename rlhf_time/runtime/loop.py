"""The training loop shared by every stage, readable top to bottom.

A stage (sft.py, reward.py, dpo.py, kd.py) only says what it needs and how a batch becomes a loss; everything else
lives here once: set-up, auxiliary models, exact gradient accumulation, mixed precision, clipping, schedules,
evaluation, early stopping, checkpoints and exact resume, logging and callbacks, and data parallelism under torchrun.
The stage hooks are at the bottom of `Trainer`; docs/stages.md ("Writing a stage") describes the contract.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_time.config import TrainingConfig
from rlhf_time.data import eval_spec, load_dataset_of_kind, plan_batches, shard_batches, train_spec, validate_data_file
from rlhf_time.data.streaming import StreamedBatches, dumps_states, loads_states
from rlhf_time.errors import RlhfTimeError
from rlhf_time.report import RunReport
from rlhf_time.templates import apply_training_template
from rlhf_time.models import apply_tuning, count_parameters, ensure_chat_template, load_causal_lm, load_tokenizer, model_family
from rlhf_time.storage import check_output_folders
from rlhf_time.runtime import checkpoint as ckpt
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import AuxiliaryModel, build_auxiliary_model, check_auxiliary_sources
from rlhf_time.runtime.callbacks import fire
from rlhf_time.runtime.distributed import all_gather_objects, all_reduce_sum, barrier, init_distributed, main_rank_first
from rlhf_time.runtime.guards import NonFiniteGuard, require_finite_weights
from rlhf_time.runtime.optimization import build_optimizer, build_scheduler
from rlhf_time.runtime.reporting import RunReporter, drop_metrics_after
from rlhf_time.runtime.resume_checks import check_data_position, check_work_left
from rlhf_time.runtime.run_folder import claim_run_folder, run_folder_lock
from rlhf_time.runtime.signals import StopSignals
from rlhf_time.runtime.trackers import check_trackers_installed
from rlhf_time.runtime.throughput import ThroughputMeter

log = logging.getLogger("rlhf_time")


class Trainer:
    """Base trainer. A stage sets the class attributes below and fills the stage hooks at the bottom of this class."""

    data_kind = "conversation"  # what its data files hold: "conversation" (SFT records) or "preference" (pairs)
    model_head = "causal_lm"  # the policy's head: "causal_lm" or "reward" (1-label sequence classification)
    default_metric_for_best_model = "eval_loss"  # the eval metric that picks the best model unless the user names one

    # ------------------------------------------------------------------------------------------ set-up
    def __init__(self, config: TrainingConfig) -> None:
        _quiet_libraries()
        self.config = config
        self.callbacks: list = []
        self.global_step = 0
        self.epoch = 0  # epoch of the next batch
        self.batch_index = 0  # index of the next batch within that epoch's plan
        self.best_metric: Optional[float] = None
        self.best_checkpoint: Optional[str] = None  # a checkpoint folder that exists and holds the best weights
        self.best_step: Optional[int] = None  # the step of the best evaluation (saved or not)
        self.evals_without_improvement = 0
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.run_dir = config.run_dir
        # Resolved here, never written into the user's config (which may have no eval_file at all).
        self.metric_for_best_model = (config.metric_for_best_model if config.is_set("metric_for_best_model")
                                      else self.default_metric_for_best_model)
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        # Bad data fails before any model is loaded.
        check_output_folders(config, cache_dir=self.data_cache_dir())  # a file in the way, read-only: say so now
        for spec in (train_spec(config), eval_spec(config)):
            if spec:
                validate_data_file(spec, config, kind=self.data_kind, cache_dir=self.data_cache_dir())
        check_trackers_installed(config.report_to)
        check_auxiliary_sources(self.auxiliary_models(), config)  # a wrong ref/teacher/reward folder: say so now

        self.family = model_family(config)
        self.tokenizer = load_tokenizer(config)
        if not (config.prompt_template or config.response_template):
            ensure_chat_template(self.tokenizer, self.family)
        apply_training_template(self.tokenizer, config)  # saved folders carry the layout used in training
        self.model = parallel.load_model(  # under FSDP: rank 0 loads, the others build on the meta device
            lambda meta: apply_tuning(load_causal_lm(config, head=self.model_head, meta=meta), config, self.family,
                                      task_type=self.peft_task_type), config, self.dist)
        if config.torch_compile:  # in place: parameter names, checkpoints and hooks stay those of the eager model
            self.model.compile()
        trainable, total = count_parameters(self.model)
        self._log(f"model {config.model_name} ({self.family.name}): {trainable:,} trainable of {total:,} parameters")
        self.amp_dtype = self._amp_dtype()
        # Before any update and before sharding, so a copy of the policy is the initial policy, whole.
        self.aux: dict[str, nn.Module] = {
            spec.name: build_auxiliary_model(spec, self.model, self.tokenizer, config, self.dist, self.amp_dtype)
            for spec in self.auxiliary_models()
        }

        with main_rank_first():  # rank 0 tokenises and caches; the other ranks then read its cache
            self.train_dataset = self.load_dataset(train_spec(config), config.max_train_samples) if config.train_file else None
            self.eval_dataset = self.load_dataset(eval_spec(config), config.max_eval_samples) if eval_spec(config) else None
        for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            if dataset is not None:
                self._log(f"{name} data: {dataset.stats.summary()}")

        self.train_model = parallel.wrap_model(self.model, config, self.dist) if self.dist.enabled else self.model
        if parallel.is_fsdp(self.model):  # frozen models are sharded as the policy is: each rank holds 1/N
            for model in self.aux.values():
                parallel.shard_model(model, config)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._resume_from: Optional[Path] = None  # loaded before the optimizer existed: its states still to load
        self._resumed_checkpoint: Optional[Path] = None  # loaded, and train() has not yet trimmed metrics.jsonl
        self._stage_metrics: dict[str, float] = {}
        self.nan_guard = NonFiniteGuard(config.nan_policy, config.nan_max_consecutive_skips)

    @property
    def peft_task_type(self) -> str:
        return "SEQ_CLS" if self.model_head == "reward" else "CAUSAL_LM"

    def _amp_dtype(self) -> Optional[torch.dtype]:
        if not self.config.use_amp:
            return None
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ---------------------------------------------------------------------------------------- the plan
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for an epoch: a pure function of seed and epoch.

        Every rank plans the same global sequence of micro-batches and takes every world_size-th one, so a
        step on N ranks sees exactly the batches that N consecutive micro-batches of one process would.
        """
        config = self.config
        batches = plan_batches(
            self.train_dataset.lengths,
            batch_size=config.batch_size,
            max_tokens_per_batch=config.max_tokens_per_batch,
            group_by_length=config.group_by_length,
            shuffle=config.shuffle,
            seed=config.seed,
            epoch=epoch,
        )
        return shard_batches(batches, self.dist.rank, self.dist.world_size)

    def total_steps(self) -> int:
        """Loop steps of the run (each takes one planned group of micro-batches and calls `update` once)."""
        if self.config.max_steps:
            return self.config.max_steps
        steps_per_epoch = math.ceil(len(self.epoch_plan(0)) / self.config.gradient_accumulation_steps)
        return max(1, math.ceil(steps_per_epoch * self.config.num_train_epochs))

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Run the configured training; returns global_step, train_loss, best metric/checkpoint, runtime, tokens/sec.

        SIGTERM / SIGINT / SIGUSR1 end it after the current step with a checkpoint (TrainingInterrupted)."""
        with StopSignals() as self.stop_signals, self.holding_run_folder():
            return self._train()

    @contextlib.contextmanager
    def holding_run_folder(self):
        """The run folder's lock (main rank) around a block; re-entrant, so a stage's train() may extend it."""
        if getattr(self, "_holds_run_folder", False) or not self.dist.is_main:
            yield
            return
        with run_folder_lock(self.run_dir):
            self._holds_run_folder = True
            try:
                yield
            finally:
                self._holds_run_folder = False

    def _train(self) -> dict[str, Any]:
        config = self.config
        if self.train_dataset is None:
            raise RlhfTimeError("train_file is not set: nothing to train on")
        total_steps = self.total_steps()
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, config)
            self.scheduler = build_scheduler(self.optimizer, config, total_steps * self.optimizer_steps_per_update())
        if config.resume_from_checkpoint and self._resume_from is None:
            self.load_from_checkpoint(ckpt.resolve_checkpoint(config.resume_from_checkpoint, self.run_dir))
        if self._resume_from is not None:
            ckpt.load_optimizer_states(self._resume_from, self._optimizer_for_checkpoint(), self.scheduler, self.scaler)
            ckpt.restore_rng(self._resume_from, ckpt.load_trainer_state(self._resume_from))
            self._resume_from = None
        if self._resumed_checkpoint is not None:  # however it was loaded (before or after the optimizer was built)
            check_work_left(self._resumed_checkpoint, self.global_step, total_steps, config)
            self._resumed_checkpoint = None
            if self.dist.is_main:  # rows logged after that checkpoint would otherwise appear twice
                drop_metrics_after(self.run_dir / "metrics.jsonl", self.global_step)
        if self.dist.is_main:
            ckpt.remove_staging_folders(self.run_dir)  # left by a process killed while writing a checkpoint

        if self.dist.is_main:  # a new run never lands on an old one (unless resuming or told to overwrite)
            claim_run_folder(self.run_dir, resuming=self.global_step > 0, overwrite=config.overwrite_output_dir)
        barrier()
        reporter = RunReporter(self.run_dir, config, enabled=self.dist.is_main)
        run_report = RunReport(enabled=self.dist.is_main).start(self)  # samples "before" for report.md
        if self.dist.is_main:
            config.to_yaml(self.run_dir / "config.yaml")
        self._meter = ThroughputMeter(self.model, self.device)
        progress = tqdm(total=total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                        disable=config.disable_progress_bar or not self.dist.is_main)
        fire(self.callbacks, "on_train_begin", self)
        start, losses, stop_early = time.perf_counter(), [], False
        plan_epoch, plan = -1, []

        while self.global_step < total_steps and not stop_early:
            self._stage_metrics = {}
            if self.streamed:  # the stream's next micro-batches (lists of examples); its epochs run on
                group = self.train_dataset.next_micro_batches(config.gradient_accumulation_steps)
                self.epoch = self.train_dataset.epoch
                collated = [self.collate(list(range(len(examples))), examples) for examples in group]
            else:
                if plan_epoch != self.epoch:
                    plan_epoch, plan = self.epoch, self.epoch_plan(self.epoch)
                if self.batch_index >= len(plan):  # epoch finished: move on
                    self.epoch, self.batch_index = self.epoch + 1, 0
                    continue
                group = plan[self.batch_index : self.batch_index + config.gradient_accumulation_steps]
                collated = [self.collate(indices) for indices in group]
            micro_batches = self.prepare_step(collated)
            step_metrics = {**self.update(micro_batches), **self._stage_metrics}
            self.batch_index += len(group)
            self.global_step += 1
            epoch_ended = not self.streamed and self.batch_index >= len(plan)
            losses.append(step_metrics["train/loss"])

            progress.update(1)
            progress.set_postfix(loss=f"{step_metrics['train/loss']:.4f}", lr=f"{step_metrics['train/lr']:.2e}",
                                 tok_s=f"{step_metrics['train/tokens_per_sec']:.0f}")
            is_last = self.global_step >= total_steps
            if self.global_step % config.logging_steps == 0 or is_last:
                reporter.report(self.global_step, {**step_metrics, "train/epoch": self._epoch_progress(plan)})
            fire(self.callbacks, "on_step_end", self, step_metrics)

            evaluated = False
            if self.eval_dataset is not None and self._due(config.eval_strategy, config.eval_steps, epoch_ended, is_last):
                metrics = self.evaluate()
                reporter.report(self.global_step, {f"eval/{k.removeprefix('eval_')}": v for k, v in metrics.items()},
                                console=False)  # evaluate() already logged them
                stop_early = self._track_best(metrics)
                evaluated = True
            saved = self._due(config.save_strategy, config.save_steps, epoch_ended, is_last) or bool(
                evaluated and self._is_new_best and config.early_stopping_patience
            )
            if saved:
                self.save_checkpoint()
            if self.stop_signals.requested(self.dist):  # pre-emption: keep this step's work, then stop
                folder = self.run_dir / f"checkpoint-{self.global_step}" if saved else self.save_checkpoint()
                progress.close()
                reporter.close()
                interrupted = self.stop_signals.interruption(folder)
                self._log(str(interrupted))
                raise interrupted
        progress.close()

        if config.early_stopping_patience and self.best_checkpoint:
            self._load_model_weights(Path(self.best_checkpoint))
            self._restore_stage_state(Path(self.best_checkpoint))  # e.g. PPO's critic: trained with the best policy
            self._log(f"loaded the best model ({self.metric_for_best_model}={self.best_metric:.4f}) from {self.best_checkpoint}")
        final_dir = self.run_dir / "final"
        self._save_model(final_dir)
        results = {
            "global_step": self.global_step,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "best_checkpoint": self._best_weights_folder(final_dir),
            "stopped_early": stop_early,
            "final_model_dir": str(final_dir),
            "train_runtime": time.perf_counter() - start,
            **self._meter.summary(),
        }
        reporter.report(self.global_step, {f"summary/{k}": v for k, v in results.items()}, console=False)
        reporter.close()
        run_report.finish(self, results)  # plots/*.png and report.md
        fire(self.callbacks, "on_train_end", self, results)
        return results

    def optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step over `micro_batches`, normalised by their global number of loss items.

        Forward/backward of each micro-batch (gradients synchronised on the last only), AMP, the non-finite check,
        clipping, the optimiser and scheduler step. Returns the step's metrics (train/loss, lr, grad_norm, the
        stage's summed metrics per item, throughput). Stages that run several passes over one prepared batch call it
        several times from `update`.
        """
        model, meter, step_start = self.train_model, self._meter, time.perf_counter()
        model.train()
        # The loss of the step is sum(per-item losses) / items in the WHOLE step (all micro-batches, all
        # ranks), so accumulation and data parallelism do not change the update.
        num_items = int(all_reduce_sum(torch.tensor(sum(self.count_items(b) for b in micro_batches), device=self.device)))
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(micro_batches) - 1
            with self._no_sync(sync), self._autocast():
                loss, metrics = self.compute_loss(model, batch, num_items)
            # DDP averages gradients over ranks; scaling by world size turns that average into the global sum.
            scaled = loss * self.dist.world_size
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            sums["loss"] += loss.detach()
            for key, value in metrics.items():
                sums[key] += value.detach()
            meter.add_batch(batch)
        totals = {key: float(all_reduce_sum(value)) for key, value in sums.items()}
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        # An inf gradient under fp16 is the scaler's business (it skips the step and lowers the scale).
        update = self.nan_guard.allow_update(self.global_step + 1, totals["loss"], None if self.scaler else grad_norm,
                                             self.run_dir)
        if self.scaler:
            if update:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif update:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = {"train/loss": totals.pop("loss"), "train/lr": lr, "train/grad_norm": grad_norm}
        if not update:
            step_metrics["train/update_skipped"] = 1.0
        step_metrics.update({f"train/{k}": self.reduce_train_metric(k, v, num_items) for k, v in totals.items()})
        step_metrics.update(meter.end_step(time.perf_counter() - step_start, self.dist.world_size))
        return step_metrics

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm) if parameters else torch.zeros(())
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _no_sync(self, sync: bool):
        return contextlib.nullcontext() if sync else parallel.no_sync(self.train_model)

    def _due(self, strategy: str, every: int, epoch_ended: bool, is_last: bool) -> bool:
        if strategy == "steps":
            return self.global_step % every == 0 or is_last
        return strategy == "epoch" and (epoch_ended or is_last)

    def _epoch_progress(self, plan: list) -> float:
        if self.streamed:  # passes the stream's reader has completed (no length to divide by)
            return float(self.train_dataset.epoch)
        return self.epoch + self.batch_index / max(1, len(plan))

    @property
    def streamed(self) -> bool:
        """Whether the train data is streamed (data/streaming.py) rather than held as a tokenised data set."""
        return isinstance(getattr(self, "train_dataset", None), StreamedBatches)

    # ---------------------------------------------------------------------- evaluation, early stopping
    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict[str, float]:
        """Metrics over the whole eval set (token-weighted for SFT); the same on every rank."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise RlhfTimeError("evaluate() needs eval_file (or pass a dataset)")
        model = self.train_model
        model.eval()
        batch_size = self.config.eval_batch_size or self.config.batch_size
        order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])  # little padding, fixed order
        batches = [order[offset : offset + batch_size] for offset in range(0, len(order), batch_size)]
        rank, world_size = self.dist.rank, self.dist.world_size
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device, dtype=torch.float64))
        start = time.perf_counter()
        # Every rank runs the same number of forwards (FSDP's all-gathers are collective): a rank past the end
        # re-runs the first batch and adds nothing.
        indices = range(rank, math.ceil(len(batches) / world_size) * world_size, world_size)
        for index in tqdm(indices, desc="eval", leave=False, dynamic_ncols=True,
                          disable=self.config.disable_progress_bar or not self.dist.is_main):
            weight = 1.0 if index < len(batches) else 0.0
            batch = self.collate(batches[index] if weight else batches[0], dataset)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                for key, value in self.eval_sums(model, batch).items():
                    sums[key] += weight * value.double()
        totals = {key: float(all_reduce_sum(value)) for key, value in sums.items()}
        metrics = self.eval_metrics(totals)
        metrics["eval_runtime"] = time.perf_counter() - start
        fire(self.callbacks, "on_evaluate", self, metrics)
        self._log("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def _track_best(self, metrics: dict[str, float]) -> bool:
        """Record whether this evaluation is the best so far; True when early stopping says stop."""
        config = self.config
        name = self.metric_for_best_model
        value = metrics.get(name, metrics.get(f"eval_{name}"))
        if value is None:
            raise RlhfTimeError(f"metric_for_best_model={name!r} is not among the eval metrics {sorted(metrics)}")
        sign = 1.0 if config.metric_greater_is_better(name) else -1.0
        self._is_new_best = self.best_metric is None or sign * (value - self.best_metric) > config.early_stopping_threshold
        if self._is_new_best:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.global_step, 0
        else:
            self.evals_without_improvement += 1
        patience = config.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            self._log(f"early stopping: {name} did not improve for {patience} evaluations (best {self.best_metric:.4f})")
            return True
        return False

    _is_new_best = False

    def _best_weights_folder(self, final_dir: Path) -> Optional[str]:
        """The folder that holds the best evaluation's weights: its checkpoint, or final/ when the best was the last
        step and saved no checkpoint; None, with a note, when they were never saved."""
        if self.best_step is None:
            return None
        if self.best_checkpoint and Path(self.best_checkpoint).is_dir():
            return self.best_checkpoint
        if self.best_step == self.global_step:
            return str(final_dir)
        self._log(f"the best {self.metric_for_best_model} was at step {self.best_step}, which saved no checkpoint "
                  f"(save_strategy={self.config.save_strategy}): final/ holds the last step's weights")
        return None

    # ------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "best_metric": self.best_metric,
            "best_checkpoint": self.best_checkpoint,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "world_size": self.dist.world_size,
            "non_finite_skips": self.nan_guard.state_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically (main rank) and rotate old ones, keeping the best."""
        folder = self.run_dir / f"checkpoint-{self.global_step}"
        require_finite_weights(self.model, folder, self.global_step, self.run_dir)
        if self.best_step == self.global_step:  # this checkpoint holds the best weights so far
            self.best_checkpoint = str(folder)
        model, optimizer = self._gather_for_save(), self._optimizer_for_checkpoint().gather()
        stage_state = self.stage_state()  # on every rank: a stage may gather shards
        # Every rank's stream position (collective), so each rank continues exactly where it stopped.
        data_state = dumps_states(all_gather_objects(self.train_dataset.state_dict())) if self.streamed else None
        if self.dist.is_main:
            ckpt.save_checkpoint(
                folder, model=model, tokenizer=self.tokenizer, optimizer=optimizer, scheduler=self.scheduler,
                scaler=self.scaler, trainer_state=self.trainer_state(), config_yaml=_config_yaml(self.config),
                stage_state=stage_state, data_state=data_state,
            )
            best = Path(self.best_checkpoint) if self.best_checkpoint else None
            ckpt.rotate_checkpoints(self.run_dir, self.config.save_total_limit, keep=best)
            self._log(f"saved {folder}")
        barrier()
        fire(self.callbacks, "on_save", self, str(folder))
        return folder

    def _gather_for_save(self):
        """The object whose save_pretrained writes the model; under FSDP the full weights are gathered (all ranks)."""
        return parallel.GatheredModel(self.model) if parallel.is_fsdp(self.model) else self.model

    def _optimizer_for_checkpoint(self) -> parallel.FullStateOptimizer:
        """The optimizer as checkpoints see it: full state keyed by parameter name, so N ranks resume on M."""
        return parallel.FullStateOptimizer(self.model, self.optimizer)

    def _restore_stage_state(self, folder: Path) -> None:
        """The stage's own state saved in checkpoint `folder` (stage_state.pt), when it saved one."""
        stage_state = ckpt.load_stage_state(folder)
        if stage_state is not None:
            self.load_stage_state(stage_state)

    def _load_model_weights(self, folder: Path) -> None:
        if parallel.is_fsdp(self.model):
            parallel.load_full_weights(self.model, folder)
        else:
            ckpt.load_model_weights(self.model, folder)

    def _save_model(self, folder: Path) -> None:
        require_finite_weights(self.model, folder, self.global_step, self.run_dir)
        model = self._gather_for_save()
        if self.dist.is_main:
            ckpt.save_model(folder, model=model, tokenizer=self.tokenizer, config_yaml=_config_yaml(self.config))
        barrier()

    def load_from_checkpoint(self, path: str | Path) -> None:
        """Load weights and training position from a checkpoint; the next train() continues exactly from there."""
        folder = Path(path)
        state = ckpt.load_trainer_state(folder)
        data_state = ckpt.load_data_state(folder)
        if self.train_dataset is not None and self.streamed != (data_state is not None):
            raise RlhfTimeError(f"{folder}: saved with streaming: {str(data_state is not None).lower()}; resume it with "
                                f"the same setting")
        if not self.streamed:  # a stream restores each rank's own position (data_state.json)
            check_data_position(folder, self.config, state.get("world_size", 1), self.dist.world_size)
        self._load_model_weights(folder)
        self.global_step = state["global_step"]
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
        self.best_metric, self.best_checkpoint = state["best_metric"], state["best_checkpoint"]
        self.best_step = state.get("best_step")
        self.evals_without_improvement = state["evals_without_improvement"]
        self.nan_guard.load_state_dict(state.get("non_finite_skips", {}))  # absent in older checkpoints: none
        if state.get("world_size", 1) != self.dist.world_size:
            # The data plan is sharded per rank; re-map the position to the same point in the global plan.
            self.batch_index = state["batch_index"] * state["world_size"] // self.dist.world_size
        if self.streamed:
            self.train_dataset.load_state_dict(loads_states(data_state))
        self._restore_stage_state(folder)
        self._resume_from = self._resumed_checkpoint = folder
        self._log(f"resumed from {folder} at step {self.global_step} (epoch {self.epoch}, batch {self.batch_index})")
        if self.optimizer is not None:
            ckpt.load_optimizer_states(folder, self._optimizer_for_checkpoint(), self.scheduler, self.scaler)
            ckpt.restore_rng(folder, state)
            self._resume_from = None

    # -------------------------------------------------------------------------------------- inference
    @property
    def inference(self):
        """predict / chat / score on the model being trained, laid out as in training (rlhf_time.inference)."""
        from rlhf_time.inference import InferenceModel

        return InferenceModel(self.model, self.tokenizer, self.config, self.family, head=self.model_head)

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

    def collate(self, indices: list[int], dataset=None) -> dict[str, torch.Tensor]:
        """The micro-batch (tensors) of these example indices of `dataset` (default: the train set)."""
        raise NotImplementedError

    def prepare_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Turn a step's collated micro-batches into what the loss trains on, before their items are counted.

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

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)


def _config_yaml(config: TrainingConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its per-load "Loading weights" bars
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # ...but keep download bars (HF_HUB_DISABLE_PROGRESS_BARS=1 still turns them off)
