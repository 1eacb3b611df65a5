"""rlhf_time: post-training for causal LMs (SFT full / LoRA / frozen layers, reward models, DPO, PPO and KD losses)."""

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError

__version__ = "0.1.0"
__all__ = ["TrainingConfig", "RlhfTimeError", "SFTrainer", "RewardTrainer", "DPOTrainer", "TrainerCallback",
           "__version__"]


def __getattr__(name: str):
    # Trainers import torch and transformers; keep `import rlhf_time` (and the CLI's --help) fast.
    if name in ("SFTrainer", "RewardTrainer", "DPOTrainer", "TrainerCallback", "Trainer"):
        import rlhf_time.trainer as trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'rlhf_time' has no attribute {name!r}")
