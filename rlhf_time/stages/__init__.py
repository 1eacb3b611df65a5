"""The one list of training stages: each stage's trainer class and the option sections it reads.

The config builds its stage sections from this list and validates `stage` against it without importing torch;
`rlhf_time.stages.trainers.TRAINERS` imports the trainer classes from here. A new stage is its trainer module, its options
module (a `Section`) and one line in each dict below.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_time.stages.dpo_options import DPOOptions
from rlhf_time.stages.grpo_options import GRPOOptions
from rlhf_time.stages.kd_options import KDOptions
from rlhf_time.stages.kto_options import KTOOptions
from rlhf_time.stages.ppo_options import PPOOptions
from rlhf_time.stages.rm_options import RMOptions
from rlhf_time.stages.rollout_options import RolloutOptions
from rlhf_time.stages.section import Section


@dataclass(frozen=True)
class Stage:
    trainer: str | type  # "module:Class", imported only when the stage runs (or the class itself)
    sections: tuple[str, ...] = ()  # the option sections the stage reads (its own first)


# Option sections: config field name -> its model. `rollout` is shared by the on-policy stages.
SECTIONS: dict[str, type[Section]] = {
    "rm": RMOptions,
    "dpo": DPOOptions,
    "kd": KDOptions,
    "kto": KTOOptions,
    "rollout": RolloutOptions,
    "grpo": GRPOOptions,
    "ppo": PPOOptions,
}

STAGES: dict[str, Stage] = {
    "sft": Stage("rlhf_time.stages.sft:SFTrainer"),
    "rm": Stage("rlhf_time.stages.reward:RewardTrainer", ("rm",)),
    "dpo": Stage("rlhf_time.stages.dpo:DPOTrainer", ("dpo",)),
    "kd": Stage("rlhf_time.stages.kd:KDTrainer", ("kd",)),
    "kto": Stage("rlhf_time.stages.kto:KTOTrainer", ("kto",)),
    "grpo": Stage("rlhf_time.stages.grpo:GRPOTrainer", ("grpo", "rollout")),
    "ppo": Stage("rlhf_time.stages.ppo:PPOTrainer", ("ppo", "rollout")),
    "online_dpo": Stage("rlhf_time.stages.online_dpo:OnlineDPOTrainer", ("dpo", "rollout")),
}

STAGE_TRAINERS: dict[str, str] = {name: stage.trainer for name, stage in STAGES.items()}


def register_stage(name: str, trainer: str | type, sections: tuple[str, ...] = ()) -> None:
    """Add a stage defined outside the package (a trainer class, or "module:Class"): `TrainingConfig(stage=name)`
    then accepts it with the option sections it reads (existing ones, e.g. "rollout"), and
    `rlhf_time.stages.trainers.trainer_for` builds it. The built-in stages are the two tables above."""
    unknown = [section for section in sections if section not in SECTIONS]
    if unknown:
        raise ValueError(f"stage {name!r}: unknown option sections {unknown}; known: {', '.join(SECTIONS)}")
    if name in STAGES:
        raise ValueError(f"stage {name!r} already exists")
    STAGES[name] = Stage(trainer, tuple(sections))
