"""The training loop shared by every stage, readable top to bottom.

A stage (sft.py, reward.py, dpo.py) only says how a batch becomes a loss; everything else lives here once:
set-up, exact gradient accumulation, mixed precision, clipping, schedules, evaluation, early stopping,
checkpoints and exact resume, logging and callbacks, and data parallelism under torchrun.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_time.config import TrainingConfig
from rlhf_time.data import plan_batches, shard_batches, validate_data_file
from rlhf_time.errors import RlhfTimeError
from rlhf_time.models import apply_tuning, count_parameters, ensure_chat_template, load_causal_lm, load_tokenizer, model_family
from rlhf_time.trainer import checkpoint as ckpt
from rlhf_time.trainer import parallel
from rlhf_time.trainer.callbacks import fire
from rlhf_time.trainer.distributed import all_reduce_sum, barrier, init_distributed, main_rank_first
from rlhf_time.trainer.optimization import build_optimizer, build_scheduler
from rlhf_time.trainer.reporting import RunReporter
from rlhf_time.trainer.throughput import ThroughputMeter

log = logging.getLogger("rlhf_time")


class Trainer:
    """Base trainer. Subclasses set `model_head` and implement the stage hooks at the bottom of this class."""

    model_head = "causal_lm"

    # ------------------------------------------------------------------------------------------ set-up
    def __init__(self, config: TrainingConfig) -> None:
        _quiet_libraries()
        self.config = config
        self.callbacks: list = []
        self.global_step = 0
        self.epoch = 0  # epoch of the next batch
        self.batch_index = 0  # index of the next batch within that epoch's plan
        self.best_metric: Optional[float] = None
        self.best_checkpoint: Optional[str] = None
        self.evals_without_improvement = 0
        self.dist = init_distributed(config.device)
        self.device = self.dist.device
        self.run_dir = config.run_dir
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        # Bad data fails before any model is loaded.
        for path in (config.train_file, config.eval_file):
            if path:
                validate_data_file(path, config)

        self.family = model_family(config)
        self.tokenizer = load_tokenizer(config)
        if not (config.prompt_template or config.response_template):
            ensure_chat_template(self.tokenizer, self.family)
        model = load_causal_lm(config, head=self.model_head)
        self.model = apply_tuning(model, config, self.family, task_type=self.peft_task_type).to(self.device)
        trainable, total = count_parameters(self.model)
        self._log(f"model {config.model_name} ({self.family.name}): {trainable:,} trainable of {total:,} parameters")

        with main_rank_first():  # rank 0 tokenises and caches; the other ranks then read its cache
            self.train_dataset = self.load_dataset(config.train_file, config.max_train_samples) if config.train_file else None
            self.eval_dataset = self.load_dataset(config.eval_file, config.max_eval_samples) if config.eval_file else None
        for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            if dataset is not None:
                self._log(f"{name} data: {dataset.stats.summary()}")

        self.train_model = self._wrap_for_data_parallel(self.model)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._resume_from: Optional[Path] = None

    @property
    def peft_task_type(self) -> str:
        return "SEQ_CLS" if self.model_head == "reward" else "CAUSAL_LM"

    def _wrap_for_data_parallel(self, model: nn.Module) -> nn.Module:
        return parallel.wrap_model(model, self.config, self.dist) if self.dist.enabled else model

    @property
    def lm_head_outside_forward_ok(self) -> bool:
        """Whether a stage may use lm_head's weight outside the model's forward (FSDP shards it after forward)."""
        return not parallel.is_fsdp(self.model)

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
        if self.config.max_steps:
            return self.config.max_steps
        steps_per_epoch = math.ceil(len(self.epoch_plan(0)) / self.config.gradient_accumulation_steps)
        return max(1, math.ceil(steps_per_epoch * self.config.num_train_epochs))

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Run the configured training; returns global_step, train_loss, best metric/checkpoint, runtime, tokens/sec."""
        config = self.config
        if self.train_dataset is None:
            raise RlhfTimeError("train_file is not set: nothing to train on")
        total_steps = self.total_steps()
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model, config)
            self.scheduler = build_scheduler(self.optimizer, config, total_steps)
        if config.resume_from_checkpoint and self._resume_from is None:
            self.load_from_checkpoint(ckpt.resolve_checkpoint(config.resume_from_checkpoint, self.run_dir))
        if self._resume_from is not None:
            ckpt.load_optimizer_states(self._resume_from, self._optimizer_for_checkpoint(), self.scheduler, self.scaler)
            ckpt.restore_rng(self._resume_from, ckpt.load_trainer_state(self._resume_from))
            self._log(f"resumed from {self._resume_from} at step {self.global_step}")
            self._resume_from = None

        reporter = RunReporter(self.run_dir, config.report_to, enabled=self.dist.is_main)
        if self.dist.is_main:
            config.to_yaml(self.run_dir / "config.yaml")
        meter = ThroughputMeter(self.model, self.device)
        progress = tqdm(total=total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                        disable=config.disable_progress_bar or not self.dist.is_main)
        fire(self.callbacks, "on_train_begin", self)
        start, losses, stop_early = time.perf_counter(), [], False
        plan_epoch, plan = -1, []

        while self.global_step < total_steps and not stop_early:
            if plan_epoch != self.epoch:
                plan_epoch, plan = self.epoch, self.epoch_plan(self.epoch)
            if self.batch_index >= len(plan):  # epoch finished: move on
                self.epoch, self.batch_index = self.epoch + 1, 0
                continue
            group = plan[self.batch_index : self.batch_index + config.gradient_accumulation_steps]
            step_metrics = self._optimizer_step([self.collate(indices) for indices in group], meter)
            self.batch_index += len(group)
            self.global_step += 1
            epoch_ended = self.batch_index >= len(plan)
            losses.append(step_metrics["train/loss"])

            progress.update(1)
            progress.set_postfix(loss=f"{step_metrics['train/loss']:.4f}", lr=f"{step_metrics['train/lr']:.2e}",
                                 tok_s=f"{step_metrics['train/tokens_per_sec']:.0f}")
            is_last = self.global_step >= total_steps
            if self.global_step % config.logging_steps == 0 or is_last:
                reporter.report(self.global_step, {**step_metrics, "train/epoch": self._epoch_progress(plan)},
                                console=config.disable_progress_bar)
            fire(self.callbacks, "on_step_end", self, step_metrics)

            evaluated = False
            if self.eval_dataset is not None and self._due(config.eval_strategy, config.eval_steps, epoch_ended, is_last):
                metrics = self.evaluate()
                reporter.report(self.global_step, {f"eval/{k.removeprefix('eval_')}": v for k, v in metrics.items()},
                                console=False)  # evaluate() already logged them
                stop_early = self._track_best(metrics)
                evaluated = True
            if self._due(config.save_strategy, config.save_steps, epoch_ended, is_last) or (
                evaluated and self._is_new_best and config.early_stopping_patience
            ):
                self.save_checkpoint()
        progress.close()

        if config.early_stopping_patience and self.best_checkpoint:
            self._load_model_weights(Path(self.best_checkpoint))
            self._log(f"loaded the best model ({config.metric_for_best_model}={self.best_metric:.4f}) from {self.best_checkpoint}")
        final_dir = self.run_dir / "final"
        self._save_model(final_dir)
        results = {
            "global_step": self.global_step,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "best_metric": self.best_metric,
            "best_checkpoint": self.best_checkpoint,
            "stopped_early": stop_early,
            "final_model_dir": str(final_dir),
            "train_runtime": time.perf_counter() - start,
            **meter.summary(),
        }
        reporter.report(self.global_step, {f"summary/{k}": v for k, v in results.items()}, console=False)
        reporter.close()
        fire(self.callbacks, "on_train_end", self, results)
        return results

    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]], meter: ThroughputMeter) -> dict[str, float]:
        """One optimiser step over its micro-batches, normalised by the step's global number of loss items."""
        model, step_start = self.train_model, time.perf_counter()
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
        if not math.isfinite(totals["loss"]):
            last = ckpt.list_checkpoints(self.run_dir)
            raise RlhfTimeError(
                f"non-finite loss ({totals['loss']}) at step {self.global_step + 1}; weights were not updated. "
                f"Last good checkpoint: {last[-1] if last else 'none'}. Try a lower learning_rate or use_amp=false."
            )
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = {"train/loss": totals.pop("loss"), "train/lr": lr, "train/grad_norm": grad_norm}
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
        return self.epoch + self.batch_index / max(1, len(plan))

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
        for index in range(rank, math.ceil(len(batches) / world_size) * world_size, world_size):
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
        name = config.metric_for_best_model
        value = metrics.get(name, metrics.get(f"eval_{name}"))
        if value is None:
            raise RlhfTimeError(f"metric_for_best_model={name!r} is not among the eval metrics {sorted(metrics)}")
        sign = 1.0 if config.metric_greater_is_better() else -1.0
        self._is_new_best = self.best_metric is None or sign * (value - self.best_metric) > config.early_stopping_threshold
        if self._is_new_best:
            self.best_metric, self.evals_without_improvement = value, 0
            self.best_checkpoint = str(self.run_dir / f"checkpoint-{self.global_step}")
        else:
            self.evals_without_improvement += 1
        patience = config.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            self._log(f"early stopping: {name} did not improve for {patience} evaluations (best {self.best_metric:.4f})")
            return True
        return False

    _is_new_best = False

    # ------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "best_metric": self.best_metric,
            "best_checkpoint": self.best_checkpoint,
            "evals_without_improvement": self.evals_without_improvement,
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically (main rank) and rotate old ones, keeping the best."""
        folder = self.run_dir / f"checkpoint-{self.global_step}"
        model, optimizer = self._gather_for_save(), self._optimizer_for_checkpoint().gather()
        if self.dist.is_main:
            ckpt.save_checkpoint(
                folder, model=model, tokenizer=self.tokenizer, optimizer=optimizer, scheduler=self.scheduler,
                scaler=self.scaler, trainer_state=self.trainer_state(), config_yaml=_config_yaml(self.config),
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

    def _load_model_weights(self, folder: Path) -> None:
        if parallel.is_fsdp(self.model):
            parallel.load_full_weights(self.model, folder)
        else:
            ckpt.load_model_weights(self.model, folder)

    def _save_model(self, folder: Path) -> None:
        model = self._gather_for_save()
        if self.dist.is_main:
            model.save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            _config_path = folder / "rlhf_time_config.yaml"
            _config_path.write_text(_config_yaml(self.config), encoding="utf-8")
        barrier()

    def load_from_checkpoint(self, path: str | Path) -> None:
        """Load weights and training position from a checkpoint; the next train() continues exactly from there."""
        folder = Path(path)
        state = ckpt.load_trainer_state(folder)
        self._load_model_weights(folder)
        self.global_step = state["global_step"]
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]
        self.best_metric, self.best_checkpoint = state["best_metric"], state["best_checkpoint"]
        self.evals_without_improvement = state["evals_without_improvement"]
        if state.get("world_size", 1) != self.dist.world_size:
            # The data plan is sharded per rank; re-map the position to the same point in the global plan.
            self.batch_index = state["batch_index"] * state["world_size"] // self.dist.world_size
        self._resume_from = folder
        if self.optimizer is not None:
            ckpt.load_optimizer_states(folder, self._optimizer_for_checkpoint(), self.scheduler, self.scaler)
            ckpt.restore_rng(folder, state)
            self._resume_from = None

    # -------------------------------------------------------------------------------------- inference
    def predict(self, prompts: list[str], **generation: Any) -> list[str]:
        """Answer each prompt (single-turn); keyword overrides: max_new_tokens, do_sample, temperature, top_p, top_k."""
        return self._generate([[{"role": "user", "content": prompt}] for prompt in prompts], **generation)

    def chat(self, messages: list[dict[str, str]], **generation: Any) -> str:
        """The assistant's reply to a conversation of {"role", "content"} messages."""
        return self._generate([messages], **generation)[0]

    def _generate(self, conversations: list[list[dict[str, str]]], **overrides: Any) -> list[str]:
        from rlhf_time.generation import generate, render_generation_prompt

        if self.model_head != "causal_lm":
            raise RlhfTimeError(f"predict/chat need a causal LM; this is a {self.model_head} model")
        config = self.config
        texts = [
            render_generation_prompt(self.tokenizer, messages, prompt_template=config.prompt_template,
                                     response_template=config.response_template, system_prompt=config.system_prompt)
            for messages in conversations
        ]
        settings = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, batch_size=config.eval_batch_size or config.batch_size)
        unknown = set(overrides) - set(settings)
        if unknown:
            raise RlhfTimeError(f"unknown generation options {sorted(unknown)}; allowed: {sorted(settings)}")
        settings.update(overrides)
        stop = [self.tokenizer.eos_token_id]
        end_of_turn = self.tokenizer.convert_tokens_to_ids(self.family.end_of_turn_token)
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id and end_of_turn not in stop:
            stop.append(end_of_turn)
        return generate(self.model, self.tokenizer, texts, stop_token_ids=stop, **settings)

    # -------------------------------------------------------------------------------------- stage hooks
    def load_dataset(self, path: str, max_samples: Optional[int]):
        raise NotImplementedError

    def collate(self, indices: list[int], dataset=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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
    transformers.utils.logging.disable_progress_bar()
