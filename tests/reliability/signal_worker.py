"""Run under torchrun by test_faults_signals.py: `signal_worker.py MODEL_DIR OUT_DIR`.

Only rank 1 receives SIGTERM (after step 2); every rank must stop after that same step, write one checkpoint
together and exit 143. Each rank records what it saw in OUT_DIR/rank<R>.json.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from rlhf_time import SFTrainer
from rlhf_time.errors import TrainingInterrupted
from tests.trainer.helpers import tiny_config

torch.set_num_threads(1)


def main(model_dir: str, out_dir: str) -> int:
    config = tiny_config(Path(out_dir), Path(model_dir), max_train_samples=32, batch_size=2, max_seq_length=48,
                         max_steps=6, save_strategy="no")
    trainer = SFTrainer(config)

    def sigterm_on_rank_one(t):
        if t.dist.rank == 1 and t.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.callbacks.append(sigterm_on_rank_one)
    try:
        trainer.train()
        code, message = 0, "finished"
    except TrainingInterrupted as stop:
        code, message = stop.exit_code, str(stop)
    record = {"exit_code": code, "message": message, "global_step": trainer.global_step}
    (Path(out_dir) / f"rank{trainer.dist.rank}.json").write_text(json.dumps(record), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
