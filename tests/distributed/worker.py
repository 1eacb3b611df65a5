"""Run under torchrun by the distributed tests: `worker.py MODEL_DIR OUT_DIR SCENARIO...`.

Each scenario trains in OUT_DIR/<scenario>/ with the settings of tests/distributed/settings.py; the test then
compares what rank 0 wrote (metrics.jsonl, checkpoints, final/) with a single process.
"""

import json
import sys
from pathlib import Path

import torch

from rlhf_time import TrainerCallback
from rlhf_time.errors import RlhfTimeError
from rlhf_time.stages.trainers import trainer_for
from tests.distributed import exit_probe
from tests.distributed.settings import distributed_config

torch.set_num_threads(1)


class FailOnRankOne(TrainerCallback):
    def on_step_end(self, trainer, metrics):
        if trainer.dist.rank == 1 and trainer.global_step == 1:
            raise RlhfTimeError("rank 1 failed on purpose")


def main(model_dir: str, out_dir: str, scenarios: list[str]) -> None:
    exit_probe.watch(out_dir)
    for scenario in scenarios:
        if scenario == "fsdp_resume":  # FSDP on 2 ranks from the FSDP run's step-2 checkpoint
            checkpoint = Path(out_dir) / "fsdp" / "outputs" / "run" / "checkpoint-2"
            config = distributed_config(Path(out_dir) / scenario, Path(model_dir), "fsdp", save_strategy="no",
                                        resume_from_checkpoint=str(checkpoint))
        elif scenario == "stream_ddp_resume":  # the streamed DDP run resumed from its step-2 checkpoint
            checkpoint = Path(out_dir) / "stream_ddp" / "outputs" / "run" / "checkpoint-2"
            config = distributed_config(Path(out_dir) / scenario, Path(model_dir), "stream_ddp", save_strategy="no",
                                        resume_from_checkpoint=str(checkpoint))
        else:
            config = distributed_config(Path(out_dir) / scenario, Path(model_dir), scenario)
        trainer = trainer_for(config)
        if scenario == "fail":
            trainer.callbacks.append(FailOnRankOne())
        trainer.train()
        # every rank reports what it computed: early stopping needs the metrics equal on all ranks
        if scenario == "fsdp" or scenario.startswith(("dpo", "rm", "kd", "kto")):
            metrics = trainer.evaluate()
            path = Path(out_dir) / scenario / f"eval-rank{trainer.dist.rank}.json"
            path.write_text(json.dumps(metrics), encoding="utf-8")
    exit_probe.note_running()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
