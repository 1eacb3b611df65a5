"""The one list of training stages: stage name -> the trainer class that runs it ("module:Class").

The config validates `stage` against these names without importing torch; `rlhf_time.trainer.TRAINERS` imports the
classes from here. A new stage is one module under rlhf_time/trainer/ plus one line here.
"""

STAGE_TRAINERS: dict[str, str] = {
    "sft": "rlhf_time.trainer.sft:SFTrainer",
    "rm": "rlhf_time.trainer.reward:RewardTrainer",
    "dpo": "rlhf_time.trainer.dpo:DPOTrainer",
    "kd": "rlhf_time.trainer.kd:KDTrainer",
    "grpo": "rlhf_time.trainer.grpo:GRPOTrainer",
    "ppo": "rlhf_time.trainer.ppo:PPOTrainer",
}
