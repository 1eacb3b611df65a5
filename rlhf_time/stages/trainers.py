"""Every stage's trainer class, imported from the one list of stages (rlhf_time.stages.STAGES)."""

import importlib

from rlhf_time.errors import RlhfTimeError
from rlhf_time.runtime.auxiliary import AuxiliaryModel
from rlhf_time.runtime.callbacks import TrainerCallback
from rlhf_time.runtime.loop import Trainer
from rlhf_time.stages import STAGE_TRAINERS, STAGES


def trainer_class(target: str | type) -> type[Trainer]:
    """The class of a stage's `trainer` entry ("module:Class" or the class)."""
    if isinstance(target, type):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


TRAINERS: dict[str, type[Trainer]] = {stage: trainer_class(target) for stage, target in STAGE_TRAINERS.items()}
SFTrainer, RewardTrainer, DPOTrainer, KDTrainer = (TRAINERS[s] for s in ("sft", "rm", "dpo", "kd"))
GRPOTrainer = TRAINERS["grpo"]
PPOTrainer = TRAINERS["ppo"]
KTOTrainer = TRAINERS["kto"]
OnlineDPOTrainer = TRAINERS["online_dpo"]


def trainer_for(config, **kwargs) -> Trainer:
    """The trainer of `config.stage` (built in, or added with rlhf_time.stages.register_stage), built from `config`."""
    if config.stage not in STAGES:
        raise RlhfTimeError(f"stage {config.stage!r} has no trainer; available: {', '.join(STAGES)}")
    return trainer_class(STAGES[config.stage].trainer)(config, **kwargs)


__all__ = ["Trainer", "SFTrainer", "RewardTrainer", "DPOTrainer", "KTOTrainer", "KDTrainer", "GRPOTrainer",
           "PPOTrainer", "OnlineDPOTrainer", "TrainerCallback", "AuxiliaryModel",
           "TRAINERS", "trainer_for", "trainer_class"]
