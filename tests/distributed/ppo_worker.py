"""Run under torchrun by tests/distributed/test_ppo_ddp.py: `ppo_worker.py MODEL_DIR OUT_DIR`.

Two PPO steps under DDP; each rank writes a checksum of its policy and critic weights and its logged metrics."""

import json
import sys
from pathlib import Path

import torch

from rlhf_time import PPOTrainer
from tests.trainer.helpers import tiny_config

torch.set_num_threads(1)


def main(model_dir: str, out_dir: str) -> None:
    config = tiny_config(Path(out_dir), Path(model_dir), stage="ppo", max_train_samples=8, batch_size=2,
                         gradient_accumulation_steps=2, num_mini_batches=2, ppo_epochs=2, max_completion_length=4,
                         max_steps=2, critic_learning_rate=1e-3, logging_steps=1,
                         reward_funcs=["tests.trainer.ppo_helpers:char_share"])
    trainer = PPOTrainer(config)
    steps = []
    trainer.callbacks.append(lambda t: steps.append(t.global_step))
    trainer.train()
    state = {"policy": [p.detach().double().sum().item() for p in trainer.model.parameters()],
             "critic": [p.detach().double().sum().item() for p in trainer.critic.parameters()],
             "kl_coef": trainer.kl_controller.value}
    Path(out_dir, f"rank{trainer.dist.rank}.json").write_text(json.dumps(state), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
