"""The shared training loop and one small module per stage."""

from rlhf_time.trainer.callbacks import TrainerCallback
from rlhf_time.trainer.loop import Trainer
from rlhf_time.trainer.dpo import DPOTrainer
from rlhf_time.trainer.reward import RewardTrainer
from rlhf_time.trainer.sft import SFTrainer

__all__ = ["Trainer", "SFTrainer", "RewardTrainer", "DPOTrainer", "TrainerCallback"]
