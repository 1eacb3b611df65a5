"""GRPO scenarios under torchrun: `grpo_worker.py MODEL_DIR OUT_DIR SCENARIO...`, or `run()` from rl_worker.py (the
launch of tests/distributed/test_grpo_ddp.py and test_ppo_ddp.py).

injected: completions fixed by the test (InjectedGRPOTrainer), compared with one process on the same global batch;
injected_rpp: the same with REINFORCE++ advantages (whitened over both ranks' tokens).
sampled, fsdp: real sampling (DDP, FSDP); every rank writes a digest of its (full) weights and its eval metrics.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from rlhf_time import GRPOTrainer
from tests.distributed import exit_probe
from tests.distributed.test_grpo_ddp import grpo_distributed_config
from tests.trainer.grpo_helpers import InjectedGRPOTrainer

torch.set_num_threads(1)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter  # FSDP: gather the shards
        digest.update(full.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(model_dir: str, out_dir: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        config = grpo_distributed_config(Path(out_dir) / scenario, Path(model_dir), scenario)
        trainer = (InjectedGRPOTrainer if scenario.startswith("injected") else GRPOTrainer)(config)
        trainer.train()
        path = Path(out_dir) / scenario / f"rank{trainer.dist.rank}.json"
        path.write_text(json.dumps({"digest": weights_digest(trainer.model), "eval": trainer.evaluate()}), encoding="utf-8")


def main(model_dir: str, out_dir: str, scenarios: list[str]) -> None:
    exit_probe.watch(out_dir)
    run(model_dir, out_dir, scenarios)
    exit_probe.note_running()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
