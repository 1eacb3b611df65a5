"""PPO scenarios under torchrun: `ppo_worker.py MODEL_DIR OUT_DIR SCENARIO...`, or `run()` from rl_worker.py (the
launch of tests/distributed/test_grpo_ddp.py and test_ppo_ddp.py).

ddp, fsdp: two PPO steps with a checkpoint after each; fsdp_resume: the fsdp run resumed from its first checkpoint.
Each rank writes digests of its full policy and critic weights (FSDP: gathered), its logged metrics' path and the
KL coefficient."""

import json
import sys
from pathlib import Path

import torch

from rlhf_time import PPOTrainer
from tests.distributed import exit_probe
from tests.distributed.grpo_worker import weights_digest
from tests.trainer.helpers import tiny_config

torch.set_num_threads(1)


def ppo_distributed_config(out_dir: Path, model_dir: Path, scenario: str):
    values = dict(stage="ppo", max_train_samples=8, batch_size=2, gradient_accumulation_steps=2,
                  ppo={"num_mini_batches": 2, "epochs": 2, "critic_learning_rate": 1e-3, "kl_target": 0.5,
                       "kl_horizon": 10.0},
                       rollout={"max_completion_length": 4, "reward_funcs": ["tests.trainer.ppo_helpers:char_share"]},
                  max_steps=2, logging_steps=1,
                  save_strategy="steps", save_steps=1,
                  )
    if scenario.startswith("fsdp"):
        values["distributed"] = "fsdp"
    if scenario == "fsdp_resume":
        values["resume_from_checkpoint"] = str(out_dir.parent / "fsdp" / "outputs" / "run" / "checkpoint-1")
    return tiny_config(out_dir, model_dir, **values)


def run(model_dir: str, out_dir: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        trainer = PPOTrainer(ppo_distributed_config(Path(out_dir) / scenario, Path(model_dir), scenario))
        trainer.train()
        state = {"policy": weights_digest(trainer.model), "critic": weights_digest(trainer.critic),
                 "kl_coef": trainer.kl_controller.value}
        Path(out_dir, scenario, f"rank{trainer.dist.rank}.json").write_text(json.dumps(state), encoding="utf-8")


def main(model_dir: str, out_dir: str, scenarios: list[str]) -> None:
    exit_probe.watch(out_dir)
    run(model_dir, out_dir, scenarios)
    exit_probe.note_running()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
