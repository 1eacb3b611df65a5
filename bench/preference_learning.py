"""Usage: python bench/preference_learning.py LR STEPS orpo,simpo,simpo+nll,sigmoid,kto,kto_labels [SEED]

ORPO / SimPO / KTO (and DPO for comparison) from a half-trained SFT model on the bundled preference data:
held-out greedy exact match (reply == chosen) and pair accuracy (avg log-prob of chosen > rejected), before/after.
kto trains on the pairs (each split into a desirable and an undesirable example), kto_labels on
examples/data/kto_train.jsonl: the same pairs split and shuffled so that no pair stays together."""
import json
import sys
import tempfile
from pathlib import Path

import torch

from rlhf_time import DPOTrainer, KTOTrainer, SFTrainer, TrainingConfig
from rlhf_time.data.quickstart import TRAIN_FILE, EVAL_FILE
from rlhf_time.constants import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
work = Path(tempfile.mkdtemp())
SEED = int(sys.argv[4]) if len(sys.argv) > 4 else 42  # the SFT start and the preference run
base = dict(seed=SEED, output_dir=str(work), report_to="none", disable_progress_bar=True, plot_metrics=False, save_strategy="no",
            eval_strategy="no", max_seq_length=64, warmup_steps_ratio=0.0, max_new_tokens=16)
sft = SFTrainer(TrainingConfig(model_name="tiny", train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE), batch_size=16,
                               learning_rate=2e-3, max_steps=150, lr_scheduler_type="constant", weight_decay=0.0,
                               experiment_name="half", **base))
half = sft.train()["final_model_dir"]
eval_records = [json.loads(l) for l in (ROOT / "examples/data/preference_eval.jsonl").read_text().splitlines()]

def measure(trainer):
    answers = trainer.predict([r["prompt"] for r in eval_records])
    exact = sum(a == r["chosen"] for a, r in zip(answers, eval_records)) / len(eval_records)
    ds = trainer.eval_dataset
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(ds), 16):
            batch = {k: v for k, v in trainer.collate(list(range(start, min(start + 16, len(ds)))), ds).items()}
            logps = trainer.sequence_logps(trainer.model, batch)
            lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
            avg = logps / lengths
            if "margin" in batch:  # DPO layout: the batch's chosen rows, then its rejected rows
                n = batch["margin"].numel()
                chosen.append(avg[:n]), rejected.append(avg[n:])
            else:  # KTO's eval set: the pairs' chosen replies (desirable), then their rejected ones
                chosen.append(avg[batch["desirable"]]), rejected.append(avg[~batch["desirable"]])
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return exact, float((chosen > rejected).float().mean())

steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
def options(m):
    return {"loss_type": "simpo", "cpo_alpha": 1.0} if m == "simpo+nll" else {"loss_type": m}
for name, dpo, lr in [(m, options(m), float(sys.argv[1]) if len(sys.argv) > 1 else 5e-4) for m in (sys.argv[3].split(",") if len(sys.argv) > 3 else ("orpo", "simpo", "sigmoid"))]:
    kto = name.startswith("kto")
    train_file = "kto_train.jsonl" if name == "kto_labels" else "preference_train.jsonl"
    config = TrainingConfig(stage="kto" if kto else "dpo", model_name=half, train_file=str(ROOT / "examples/data" / train_file),
                            eval_file=str(ROOT / "examples/data/preference_eval.jsonl"), batch_size=16, learning_rate=lr,
                            max_steps=steps, lr_scheduler_type="constant", weight_decay=0.0, experiment_name=name,
                            **({} if kto else {"dpo": dpo}), **base)
    trainer = KTOTrainer(config) if kto else DPOTrainer(config)
    before = measure(trainer)
    trainer.train()
    after = measure(trainer)
    print(f"{name}: seed {SEED} lr {lr} steps {steps}: exact match {before[0]:.3f} -> {after[0]:.3f}; pair accuracy {before[1]:.3f} -> {after[1]:.3f}", flush=True)
