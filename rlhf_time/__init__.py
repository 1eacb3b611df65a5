"""rlhf_time: post-training for causal LMs (SFT full / LoRA / frozen layers, reward models, DPO / ORPO / SimPO, KTO,
distillation, GRPO, PPO)."""

from rlhf_time.config import TrainingConfig
from rlhf_time.errors import RlhfTimeError
from rlhf_time.logs import install_default_handler, set_verbosity

install_default_handler()  # the API prints its progress lines like the CLI does (see rlhf_time/logs.py)

from rlhf_time.constants import VERSION as __version__
_TRAINER_NAMES = ("SFTrainer", "RewardTrainer", "DPOTrainer", "KTOTrainer", "KDTrainer", "GRPOTrainer", "PPOTrainer",
                  "OnlineDPOTrainer", "TrainerCallback", "Trainer", "AuxiliaryModel")
__all__ = ["TrainingConfig", "RlhfTimeError", *_TRAINER_NAMES, "InferenceModel", "set_verbosity", "__version__"]


def __getattr__(name: str):
    # Trainers import torch and transformers; keep `import rlhf_time` (and the CLI's --help) fast.
    if name in _TRAINER_NAMES:
        import rlhf_time.stages.trainers as trainer

        return getattr(trainer, name)
    if name == "InferenceModel":
        from rlhf_time.inference import InferenceModel

        return InferenceModel
    raise AttributeError(f"module 'rlhf_time' has no attribute {name!r}")
