"""GRPO speed: rlhf_time's GRPOTrainer against TRL's GRPOTrainer, same model, prompts, reward, G, lengths and steps.

    python bench/grpo.py [--method grpo|rloo|gspo] [--steps 30] [--repeats 3] [--threads 1] [--out bench/out/grpo]

--method rloo: rlhf_time's grpo.advantage_estimator rloo against TRL's RLOOTrainer (beta 0, no advantage
normalisation); gspo: importance_sampling_level sequence with loss_type grpo on both sides (GSPO's setup).

Set-up (once, cached in --out): the embedded tiny model trained part-way on the quickstart task with SFT (150 steps),
so the reward moves. Then each variant runs in its own subprocess, one after the other:
  - prompts: examples/data/grpo_train.jsonl (quickstart numbers, chat template), 4 prompts x G = 8 completions per
    optimiser step, no accumulation, the same shuffled order is not guaranteed (each library's own sampler);
  - sampling: temperature 0.7, top_k 0, top_p 1, at most 8 new tokens, stop at the end-of-turn token;
  - reward: digit_accuracy (examples/grpo_rewards.py), the share of right numerals;
  - loss: dapo aggregation, scale_rewards group, epsilon 0.2, no KL (no reference model), mu = 1;
  - optimiser: AdamW lr 3e-4 constant, no warmup, no weight decay, clip 1.0, float32.
Reported: seconds per step (median over the repeats, first 2 steps of each run excluded), generation's share of the step, the reward curve (mean
train reward per step, as each library logs it), and, on the 64 held-out prompts, the mean reward of 8 sampled
completions of each final model, measured by the same function for both. Writes results.json and grpo_reward.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from toolkit import ROOT, finish_child, markdown_table, run_child

sys.path.insert(0, str(ROOT / "examples"))  # grpo_rewards

TRAIN, EVAL = ROOT / "examples" / "data" / "grpo_train.jsonl", ROOT / "examples" / "data" / "grpo_eval.jsonl"
PROMPTS, G, NEW_TOKENS, LR, TEMPERATURE = 4, 8, 8, 3e-4, 0.7
METHOD = "grpo"  # set by --method: grpo, rloo or gspo


def _grpo_options() -> dict:
    return {"rloo": {"advantage_estimator": "rloo"}, "gspo": {"importance_sampling_level": "sequence",
                                                             "loss_type": "grpo"}}.get(METHOD, {})


def half_trained_model(out: Path) -> Path:
    """The quickstart SFT model after 150 steps (cached): it writes some numerals right."""
    from rlhf_time import SFTrainer, TrainingConfig
    from rlhf_time.data.quickstart import TRAIN_FILE

    final = out / "sft" / "final"
    if (final / "config.json").is_file():
        return final
    config = TrainingConfig(model_name="tiny", output_dir=str(out), experiment_name="sft", train_file=str(TRAIN_FILE),
                            batch_size=16, learning_rate=2e-3, max_steps=150, lr_scheduler_type="constant",
                            warmup_steps_ratio=0.0, weight_decay=0.0, max_seq_length=64, eval_strategy="no",
                            save_strategy="no", report_to="none", disable_progress_bar=True)
    SFTrainer(config).train()
    return final


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- variants
def run_rlhf_time(model_dir: Path, out: Path, steps: int) -> dict:
    from rlhf_time import GRPOTrainer, TrainerCallback, TrainingConfig
    from grpo_rewards import digit_accuracy

    timing = {"generation": 0.0}

    class Timed(GRPOTrainer):
        def sample_rollout(self, *args, **kwargs):
            start = time.perf_counter()
            rollout = super().sample_rollout(*args, **kwargs)
            timing["generation"] += time.perf_counter() - start
            return rollout

    step_times, rewards = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, trainer, metrics):
            now = time.perf_counter()
            step_times.append(now - clock["last"])
            clock["last"] = now
            rewards.append(metrics["train/reward"])

    config = TrainingConfig(stage="grpo", model_name=str(model_dir), output_dir=str(out), experiment_name="rlhf_time",
                            train_file=str(TRAIN), batch_size=PROMPTS, grpo={"num_generations": G, **_grpo_options()},
                            rollout={"max_completion_length": NEW_TOKENS},
                            temperature=TEMPERATURE, top_k=0, learning_rate=LR, lr_scheduler_type="constant",
                            warmup_steps_ratio=0.0, weight_decay=0.0, max_steps=steps, eval_strategy="no",
                            save_strategy="no", report_to="none", disable_progress_bar=True, logging_steps=1000,
                            overwrite_output_dir=True)  # each repeat replaces the last
    trainer = Timed(config, reward_funcs=[digit_accuracy])
    trainer.callbacks.append(Clock())
    clock = {"last": time.perf_counter()}
    start = time.perf_counter()
    results = trainer.train()
    total = time.perf_counter() - start
    return {"step_times": step_times, "rewards": rewards, "generation_s": timing["generation"], "total_s": total,
            "final_model_dir": results["final_model_dir"]}


def run_trl(model_dir: Path, out: Path, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from grpo_rewards import digit_accuracy

    def reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return digit_accuracy(prompts, texts, answer)

    reward.__name__ = "digit_accuracy"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in _records(TRAIN)])
    common = dict(output_dir=str(out / "trl"), per_device_train_batch_size=PROMPTS * G, num_generations=G,
                  gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, temperature=TEMPERATURE,
                  top_k=0, top_p=1.0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, max_steps=steps, beta=0.0, epsilon=0.2, num_iterations=1,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=42,
                  disable_tqdm=True, gradient_checkpointing=False)  # TRL turns it on by default; rlhf_time does not
    if METHOD == "rloo":
        args, trainer_class = RLOOConfig(normalize_advantages=False, **common), RLOOTrainer
    else:
        args, trainer_class = GRPOConfig(scale_rewards="group", **common, **(
            {"importance_sampling_level": "sequence", "loss_type": "grpo"} if METHOD == "gspo"
            else {"loss_type": "dapo"})), GRPOTrainer
    step_times, timing = [], {"generation": 0.0}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_times.append(now - clock["last"])
            clock["last"] = now

    trainer = trainer_class(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[Clock()])
    generate = trainer.model.generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        result = generate(*a, **k)
        timing["generation"] += time.perf_counter() - start
        return result

    trainer.model.generate = timed_generate
    clock = {"last": time.perf_counter()}
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    final = out / "trl" / "final"
    trainer.model.generate = generate
    trainer.save_model(str(final))
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"step_times": step_times, "rewards": rewards, "generation_s": timing["generation"], "total_s": total,
            "final_model_dir": str(final)}


def held_out_reward(model_dir: str, samples: int = 8, seed: int = 123) -> float:
    """Mean digit_accuracy of `samples` sampled completions of each held-out prompt (same function for both)."""
    from transformers import AutoModelForCausalLM

    from grpo_rewards import digit_accuracy
    from rlhf_time.models.tiny import load_tiny_tokenizer
    from rlhf_time.experience.sampler import sample

    tokenizer = load_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = _records(EVAL)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rollout = sample(model, ids, num_samples=samples, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                     stop_token_ids=[tokenizer.eos_token_id], temperature=TEMPERATURE, top_k=0,
                     generator=torch.Generator().manual_seed(seed))
    texts = tokenizer.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
    answers = [r["answer"] for r in records for _ in range(samples)]
    values = digit_accuracy(None, texts, answers)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- driver
def child(variant: str, model_dir: str, out: str, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    runner = {"rlhf_time": run_rlhf_time, "trl": run_trl}[variant]
    finish_child(runner(Path(model_dir), Path(out), steps), Path(out, f"{variant}.json"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("grpo", "rloo", "gspo"), default="grpo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report-only", action="store_true", help="print the table of an earlier run's results.json")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "grpo"))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "MODEL_DIR"))
    args = parser.parse_args()
    global METHOD
    METHOD = args.method
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args.child[0], args.child[1], str(out), args.steps, args.threads)
    if args.report_only:
        return report(json.loads((out / "results.json").read_text(encoding="utf-8")), out)
    torch.set_num_threads(args.threads)
    model_dir = half_trained_model(out)
    results = {}
    # Alternate the variants `repeats` times (a shared machine's load drifts); step times are pooled, the reward
    # curve and the final model are the first run's (every run is seeded alike).
    for repeat in range(args.repeats):
        for variant in ("rlhf_time", "trl"):
            command = [sys.executable, __file__, "--child", variant, str(model_dir), "--steps", str(args.steps),
                       "--threads", str(args.threads), "--out", str(out), "--method", args.method]
            run = run_child(command, out / f"{variant}.json", env={"PYTHONPATH": str(ROOT), **_env()})
            if repeat == 0:
                results[variant] = run
                results[variant]["held_out_reward"] = held_out_reward(run["final_model_dir"])
                results[variant]["pooled_step_times"], results[variant]["generation_shares"] = [], []
            results[variant]["pooled_step_times"] += run["step_times"][2:]
            results[variant]["generation_shares"].append(run["generation_s"] / run["total_s"])
    results["held_out_reward_before"] = held_out_reward(str(model_dir))
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    report(results, out)


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def report(results: dict, out: Path) -> None:
    rows = []
    base = statistics.median(results["trl"]["pooled_step_times"])
    for variant in ("rlhf_time", "trl"):
        r = results[variant]
        per_step = statistics.median(r["pooled_step_times"])
        rewards = r["rewards"]
        window = max(1, len(rewards) // 3)
        rows.append([variant, f"{per_step:.3f}", f"{base / per_step:.2f}x", f"{statistics.mean(r['generation_shares']):.0%}",
                     f"{statistics.mean(rewards[:window]):.3f}", f"{statistics.mean(rewards[-window:]):.3f}",
                     f"{r['held_out_reward']:.3f}", f"{r['peak_memory_gb']:.2f}"])
    print("\n".join(markdown_table(["variant", "s/step (median)", "steps/s vs TRL", "generation share",
                                    "train reward, first third of steps", "last third", "held-out sampled reward after",
                                    "peak RSS (GB)"], rows)))
    print(f"held-out sampled reward before GRPO: {results['held_out_reward_before']:.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        for variant in ("rlhf_time", "trl"):
            axis.plot(range(1, len(results[variant]["rewards"]) + 1), results[variant]["rewards"], label=variant)
        axis.set_xlabel("step")
        axis.set_ylabel("mean train reward")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "grpo_reward.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
