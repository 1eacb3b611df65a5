"""Run under torchrun for tests/distributed/test_grpo_ddp.py and test_ppo_ddp.py together: `rl_worker.py MODEL_DIR
OUT_DIR` trains GRPO's scenarios in OUT_DIR/grpo/, then PPO's in OUT_DIR/ppo/ (one start of torchrun and of its two
ranks instead of one per test module). Like each module's own launch did, it ends with a run under FSDP (PPO's
fsdp_resume); OUT_DIR holds the exit probe's files.
"""

import sys
from pathlib import Path

import torch

from tests.distributed import exit_probe, grpo_worker, ppo_worker

torch.set_num_threads(1)

GRPO_SCENARIOS = ("injected", "injected_rpp", "sampled", "environment", "fsdp")
PPO_SCENARIOS = ("ddp", "fsdp", "fsdp_resume")


def main(model_dir: str, out_dir: str) -> None:
    exit_probe.watch(out_dir)
    grpo_worker.run(model_dir, str(Path(out_dir) / "grpo"), list(GRPO_SCENARIOS))
    ppo_worker.run(model_dir, str(Path(out_dir) / "ppo"), list(PPO_SCENARIOS))
    exit_probe.note_running()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
