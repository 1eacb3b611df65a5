"""rlhf_time: post-training for causal LMs (SFT full / LoRA / frozen layers, reward models, DPO, distillation)."""

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError

__version__ = "0.1.0"
_TRAINER_NAMES = ("SFTrainer", "RewardTrainer", "DPOTrainer", "KDTrainer", "TrainerCallback", "Trainer", "AuxiliaryModel")
__all__ = ["TrainingConfig", "RlhfTimeError", *_TRAINER_NAMES, "InferenceModel", "__version__"]


def __getattr__(name: str):
    # Trainers import torch and transformers; keep `import rlhf_time` (and the CLI's --help) fast.
    if name in _TRAINER_NAMES:
        import rlhf_time.trainer as trainer

        return getattr(trainer, name)
    if name == "InferenceModel":
        from rlhf_time.inference import InferenceModel

        return InferenceModel
    raise AttributeError(f"module 'rlhf_time' has no attribute {name!r}")
