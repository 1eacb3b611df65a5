"""The shared training loop and one small module per stage (rlhf_time.stages lists them)."""

import importlib

from rlhf_time.errors import RlhfTimeError
from rlhf_time.stages import STAGE_TRAINERS
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.runtime.callbacks import TrainerCallback
from rlhf_time.runtime.loop import Trainer


def _import(target: str) -> type[Trainer]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


TRAINERS: dict[str, type[Trainer]] = {stage: _import(target) for stage, target in STAGE_TRAINERS.items()}
SFTrainer, RewardTrainer, DPOTrainer, KDTrainer = (TRAINERS[s] for s in ("sft", "rm", "dpo", "kd"))
GRPOTrainer = TRAINERS["grpo"]
PPOTrainer = TRAINERS["ppo"]


def trainer_for(config) -> Trainer:
    """The trainer of `config.stage`, built from `config`."""
    if config.stage not in TRAINERS:
        raise RlhfTimeError(f"stage {config.stage!r} has no trainer; available: {', '.join(TRAINERS)}")
    return TRAINERS[config.stage](config)


__all__ = ["Trainer", "SFTrainer", "RewardTrainer", "DPOTrainer", "KDTrainer", "GRPOTrainer", "PPOTrainer",
           "TrainerCallback", "AuxiliaryModel",
           "TRAINERS", "trainer_for"]
