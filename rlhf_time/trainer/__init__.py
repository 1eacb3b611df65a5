"""The shared training loop and one small module per stage."""

from rlhf_time.errors import RlhfTimeError
from rlhf_time.trainer.callbacks import TrainerCallback
from rlhf_time.trainer.loop import Trainer
from rlhf_time.trainer.dpo import DPOTrainer
from rlhf_time.trainer.reward import RewardTrainer
from rlhf_time.trainer.sft import SFTrainer

TRAINERS = {"sft": SFTrainer, "rm": RewardTrainer, "dpo": DPOTrainer}


def trainer_for(config) -> Trainer:
    """The trainer of `config.stage`, built from `config`."""
    if config.stage not in TRAINERS:
        raise RlhfTimeError(f"stage {config.stage!r} has no trainer yet; available: {', '.join(TRAINERS)}")
    return TRAINERS[config.stage](config)


__all__ = ["Trainer", "SFTrainer", "RewardTrainer", "DPOTrainer", "TrainerCallback", "TRAINERS", "trainer_for"]
