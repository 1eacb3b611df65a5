"""The training loop shared by every stage, readable top to bottom.

A stage (rlhf_time/stages/) only says what it needs and how a batch becomes a loss; everything else lives in the
runtime once: set-up, auxiliary models, the batch source (batches.py), the optimiser step with exact accumulation,
mixed precision, clipping and the non-finite guard (update.py), evaluation, early stopping, checkpoints and exact
resume (saving.py), logging and callbacks, and data parallelism under torchrun. The hooks a stage fills are in
hooks.py; docs/stages.md ("Writing a stage") describes the contract.
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
from rlhf_time.data import eval_spec, plan_batches, shard_batches, train_spec, validate_data_file
from rlhf_time.data.streaming import StreamedBatches
from rlhf_time.errors import RlhfTimeError
from rlhf_time.experience.engines import create_sampling_engine
from rlhf_time.experience.sampler import SamplingEngine
from rlhf_time.models import apply_tuning, count_parameters, ensure_chat_template, load_causal_lm, load_tokenizer, model_family
from rlhf_time.report import RunReport
from rlhf_time.runtime import checkpoint as ckpt
from rlhf_time.runtime import parallel
from rlhf_time.runtime.auxiliary import build_auxiliary_model, check_auxiliary_sources
from rlhf_time.runtime.batches import PlannedBatches, StreamedSource
from rlhf_time.runtime.callbacks import fire
from rlhf_time.runtime.distributed import all_reduce_sum, barrier, init_distributed, main_rank_first
from rlhf_time.runtime.guards import NonFiniteGuard
from rlhf_time.runtime.hooks import StageHooks
from rlhf_time.runtime.optimization import build_optimizer, build_scheduler
from rlhf_time.runtime.reporting import RunReporter, drop_metrics_after
from rlhf_time.runtime.resume_checks import check_work_left
from rlhf_time.runtime.saving import Checkpointing
from rlhf_time.runtime.run_folder import claim_run_folder, run_folder_lock
from rlhf_time.runtime.signals import StopSignals
from rlhf_time.runtime.trackers import check_trackers_installed
from rlhf_time.runtime.update import ModelUpdate
from rlhf_time.runtime.throughput import ThroughputMeter
from rlhf_time.storage import check_output_folders
from rlhf_time.templates import apply_training_template

log = logging.getLogger("rlhf_time")


class Trainer(StageHooks, Checkpointing):
    """The loop. A stage sets the class attributes and fills the hooks of StageHooks (rlhf_time.runtime.hooks);
    checkpoints and resume are Checkpointing's (rlhf_time.runtime.saving)."""

    # ------------------------------------------------------------------------------------------ set-up
    def __init__(self, config: TrainingConfig) -> None:
        _quiet_libraries()
        self.config = config
        self.callbacks: list = []
        self.global_step = 0
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
        # The one generation path: on-policy sampling, KD's student replies, predict and chat (experience.sampler).
        # FSDP ranks must run the same forwards, which only kv_cache can (stop_early=False); the config refuses an
        # explicit transformers_paged there.
        engine = "kv_cache" if config.distributed == "fsdp" else config.rollout.engine
        self.sampling_engine: SamplingEngine = create_sampling_engine(engine, self.model)
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

        self.batches = self._batch_source()  # the train data's micro-batches, step by step (None: no train_file)
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

    def _batch_source(self):
        if self.train_dataset is None:
            return None
        if self.streamed:
            return StreamedSource(self.train_dataset, self.config.gradient_accumulation_steps)
        return PlannedBatches(self.train_dataset, self.epoch_plan, self.config.gradient_accumulation_steps)

    @property
    def epoch(self) -> int:
        """The epoch of the next micro-batch."""
        return self.batches.epoch if self.batches is not None else 0

    @property
    def batch_index(self) -> int:
        """Micro-batches taken in that epoch (streamed: in the run)."""
        return self.batches.batch_index if self.batches is not None else 0

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
            self.policy_update = ModelUpdate(self.model, self.train_model, self.optimizer, self.scheduler,
                                             self.nan_guard, max_grad_norm=config.max_grad_norm,
                                             world_size=self.dist.world_size, device=self.device, scaler=self.scaler,
                                             autocast=self._autocast)
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
        while self.global_step < total_steps and not stop_early:
            self._stage_metrics = {}
            collated = [self.collate(indices, dataset) for indices, dataset in self.batches.next()]
            micro_batches = self.prepare_step(collated, self.train_dataset)
            step_metrics = {**self.update(micro_batches), **self._stage_metrics}
            self.global_step += 1
            epoch_ended = self.batches.epoch_ended
            losses.append(step_metrics["train/loss"])

            progress.update(1)
            progress.set_postfix(loss=f"{step_metrics['train/loss']:.4f}", lr=f"{step_metrics['train/lr']:.2e}",
                                 tok_s=f"{step_metrics['train/tokens_per_sec']:.0f}")
            is_last = self.global_step >= total_steps
            if self.global_step % config.logging_steps == 0 or is_last:
                reporter.report(self.global_step, {**step_metrics, "train/epoch": self.batches.progress()})
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
        """One optimiser step of the policy over `micro_batches`, normalised by their global number of loss items
        (rlhf_time.runtime.update: accumulation, AMP, clipping, the non-finite guard, the schedule). Returns the
        step's metrics (train/loss, lr, grad_norm, the stage's summed metrics per item, throughput). Stages that
        run several passes over one prepared batch call it several times from `update`."""
        step_start = time.perf_counter()
        result = self.policy_update.step(micro_batches, self.compute_loss, self.count_items,
                                         global_step=self.global_step + 1, run_dir=self.run_dir,
                                         on_batch=self._meter.add_batch)
        step_metrics = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm}
        if not result.applied:
            step_metrics["train/update_skipped"] = 1.0
        step_metrics.update({f"train/{k}": self.reduce_train_metric(k, v, result.num_items)
                             for k, v in result.sums.items()})
        step_metrics.update(self._meter.end_step(time.perf_counter() - step_start, self.dist.world_size))
        return step_metrics

    def _due(self, strategy: str, every: int, epoch_ended: bool, is_last: bool) -> bool:
        if strategy == "steps":
            return self.global_step % every == 0 or is_last
        return strategy == "epoch" and (epoch_ended or is_last)

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
                for key, value in self.eval_sums(model, batch, dataset).items():
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

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            log.info(message)


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its per-load "Loading weights" bars
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # ...but keep download bars (HF_HUB_DISABLE_PROGRESS_BARS=1 still turns them off)
