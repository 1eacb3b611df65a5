"""What the loop saves and restores: checkpoints (atomic, rotated, the best kept), the final model, and resume at
exactly the position, optimiser, schedule, RNG and stage state a checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rlhf_time.config import TrainingConfig
from rlhf_time.data.streaming import dumps_states, loads_states
from rlhf_time.errors import RlhfTimeError
from rlhf_time.runtime import checkpoint as ckpt
from rlhf_time.runtime import parallel
from rlhf_time.runtime.callbacks import fire
from rlhf_time.runtime.distributed import all_gather_objects, barrier
from rlhf_time.runtime.guards import require_finite_weights
from rlhf_time.runtime.resume_checks import check_data_position


class Checkpointing:
    """The loop's checkpoint and resume methods (self.model, self.batches, ... are the loop's)."""

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
        data_state = dumps_states(all_gather_objects(self.batches.state_dict())) if self.streamed else None
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
        self.best_metric, self.best_checkpoint = state["best_metric"], state["best_checkpoint"]
        self.best_step = state.get("best_step")
        self.evals_without_improvement = state["evals_without_improvement"]
        self.nan_guard.load_state_dict(state.get("non_finite_skips", {}))  # absent in older checkpoints: none
        if self.streamed:
            self.batches.load_state_dict(loads_states(data_state))
            self.batches.batch_index = state["batch_index"]
        elif self.batches is not None:
            self.batches.load_state_dict(state, state.get("world_size", 1), self.dist.world_size)
        self._restore_stage_state(folder)
        self._resume_from = self._resumed_checkpoint = folder
        self._log(f"resumed from {folder} at step {self.global_step} (epoch {self.epoch}, batch {self.batch_index})")
        if self.optimizer is not None:
            ckpt.load_optimizer_states(folder, self._optimizer_for_checkpoint(), self.scheduler, self.scaler)
            ckpt.restore_rng(folder, state)
            self._resume_from = None



def _config_yaml(config: TrainingConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
