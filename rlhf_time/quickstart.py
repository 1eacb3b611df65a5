"""The quickstart run (`rlhf-time train` with no config): the embedded tiny model learns the bundled task.

The task's data lives in rlhf_time.data.quickstart; this module sits above the trainer, next to the CLI.
"""

from __future__ import annotations

import json

from rlhf_time.data.quickstart import EVAL_FILE, TRAIN_FILE


def quickstart_config(overrides: list[str] | None = None):
    """The quickstart run: the embedded tiny model learns the task on a laptop CPU in about a minute."""
    from rlhf_time.config import TrainingConfig, parse_overrides

    values = dict(
        experiment_name="quickstart", model_name="tiny", train_file=str(TRAIN_FILE), eval_file=str(EVAL_FILE),
        batch_size=16, learning_rate=2e-3, num_train_epochs=4, lr_scheduler_type="cosine", warmup_steps_ratio=0.05,
        weight_decay=0.0, max_seq_length=64, eval_strategy="epoch", save_strategy="no", logging_steps=20,
        max_new_tokens=16, overwrite_output_dir=True,  # a demo: running it again starts over
    )
    values.update(parse_overrides(overrides or []))
    return TrainingConfig(**values)


def exact_match(trainer, records: list[dict[str, str]]) -> float:
    """Share of eval prompts whose greedy answer equals the reference exactly."""
    answers = trainer.predict([r["prompt"] for r in records])
    return sum(a == r["response"] for a, r in zip(answers, records)) / len(records)


def run_quickstart(overrides: list[str] | None = None) -> dict:
    """Exact match before training, train, exact match after, and one sample answer (printed and returned)."""
    from rlhf_time.stages.trainers import SFTrainer

    trainer = SFTrainer(quickstart_config(overrides))
    records = [json.loads(line) for line in EVAL_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    before = exact_match(trainer, records)
    print(f"exact match before training: {before:.1%}", flush=True)
    results = trainer.train()
    after = exact_match(trainer, records)
    sample = records[0]
    answer = trainer.predict([sample["prompt"]])[0]
    print(f"exact match after training:  {after:.1%}  (eval loss {trainer.best_metric or float('nan'):.4f})")
    print(f"sample: {sample['prompt']} -> {answer}   (reference {sample['response']})")
    print(f"model saved to {results['final_model_dir']}")
    return {"exact_match_before": before, "exact_match_after": after, **results}
