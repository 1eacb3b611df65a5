"""The shared training loop and one small module per stage."""

from rlhf_time.trainer.callbacks import TrainerCallback
from rlhf_time.trainer.loop import Trainer
from rlhf_time.trainer.sft import SFTrainer

__all__ = ["Trainer", "SFTrainer", "TrainerCallback"]
