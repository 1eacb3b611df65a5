"""Usage: python bench/rl_family.py [SEED ...]

GRPO and its family on the tests' task (tests/trainer): from the quickstart model after 150 SFT steps, the dense
char_share reward, each method's held-out sampled reward before -> after (64 prompts x 8 samples, temperature 0.7,
fixed sampling seed), the KL of the final policy to the start on those samples (mean per-token k3), and wall time.
Settings are GRPO's learning-test row: batch 4 prompts x G 8, 8 completion tokens, lr 3e-4 constant, 30 steps;
online DPO takes 8 prompts x 2 samples for 40 steps (its test's row)."""
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_time import SFTrainer  # noqa: E402
from rlhf_time.loss import k3_kl  # noqa: E402
from rlhf_time.models.tiny import tiny_model_path  # noqa: E402
from rlhf_time.stages.trainers import trainer_for  # noqa: E402
from tests.trainer.helpers import tiny_config  # noqa: E402
from tests.trainer.test_grpo import full_logits_logps, held_out_reward  # noqa: E402

METHODS = {
    "grpo": dict(grpo={"num_generations": 8}),
    "rloo": dict(grpo={"num_generations": 8, "advantage_estimator": "rloo"}),
    "reinforce_pp (kl_coef 0.01)": dict(grpo={"num_generations": 8, "advantage_estimator": "reinforce_pp",
                                              "kl_coef": 0.01}),
    "gspo (sequence ratio)": dict(grpo={"num_generations": 8, "importance_sampling_level": "sequence",
                                        "loss_type": "grpo"}),
    "online_dpo": dict(stage="online_dpo", batch_size=8, max_steps=40),
}


def held_out_kl(trainer, start_dir) -> float:
    """Mean per-token k3 KL(final || start) on completions the final policy samples for the held-out prompts."""
    from rlhf_time.experience.sampler import sample
    from transformers import AutoModelForCausalLM

    dataset, config = trainer.eval_dataset, trainer.config
    rollout = sample(trainer.model, [dataset.input_ids[i] for i in range(len(dataset))], num_samples=8,
                     max_new_tokens=config.rollout.max_completion_length, pad_token_id=trainer.tokenizer.pad_token_id,
                     stop_token_ids=trainer.stop_token_ids(), temperature=config.temperature,
                     generator=torch.Generator().manual_seed(321))
    from rlhf_time.experience.experience import Experience

    batch = Experience(list(range(len(dataset))), rollout, torch.zeros(1), [], [], 8).batch()
    start = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32).eval()
    final_logps = full_logits_logps(trainer.model, batch, config.temperature)
    start_logps = full_logits_logps(start, batch, config.temperature)
    mask = batch["loss_mask"]
    return float((k3_kl(final_logps, start_logps) * mask).sum() / mask.sum())


def main(seeds: list[int]) -> None:
    work = Path(tempfile.mkdtemp())
    model_dir = tiny_model_path(work / "tiny")
    for seed in seeds:
        half = SFTrainer(tiny_config(work / f"half{seed}", model_dir, max_train_samples=None, batch_size=16,
                                     learning_rate=2e-3, max_steps=150, lr_scheduler_type="constant", weight_decay=0.0,
                                     seed=seed)).train()["final_model_dir"]
        for name, settings in METHODS.items():
            values = dict(stage="grpo", max_train_samples=None, max_eval_samples=64, batch_size=4, max_steps=30,
                          rollout={"max_completion_length": 8, "reward_funcs": ["tests.trainer.grpo_helpers:char_share"]},
                          learning_rate=3e-4, temperature=0.7, lr_scheduler_type="constant", weight_decay=0.0,
                          logging_steps=10, seed=seed)
            values.update(settings)
            trainer = trainer_for(tiny_config(work / f"{seed}-{name.split()[0]}", Path(half), **values))
            before, _ = held_out_reward(trainer)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
            after, _ = held_out_reward(trainer)
            kl = held_out_kl(trainer, half)
            print(f"| {name} | {seed} | {values['max_steps']} | {before:.3f} → {after:.3f} | {kl:.4f} | {wall:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [42])
