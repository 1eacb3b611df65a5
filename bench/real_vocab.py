"""SFT, DPO and GRPO at Qwen's real vocabulary: rlhf_time against TRL, same model, same examples, same batches.

    python bench/real_vocab.py sft [--model 256x4|512x8|0.6b] [--steps 10] [--batch-size 8] [--device cpu|cuda] [--bf16]
    python bench/real_vocab.py dpo [--model 256x4] [--steps 10] [--batch-size 4] ...
    python bench/real_vocab.py grpo [--model 256x4] [--steps 3] [--batch-size 8] [--completion-tokens 256] ...

SFT's rlhf_time_chunk32 / rlhf_time_chunk512 variants set loss_chunk_bytes to 32 / 512 MiB (the default: 128 MiB),
to weigh the memory a chunk size saves against the time it costs in one run.

Every variant runs in its own subprocess (so peak memory is its own), one after the other, on:
  - Qwen3's 151,669-token tokenizer converted offline from qwen.tiktoken (bench/qwen_vocab.py; token ids checked
    against tiktoken on every text of the run, recorded in the results);
  - a Qwen3 model from a config with Qwen3's vocab_size 151,936 and an untied LM head (0.6b: Qwen3-0.6B's shape,
    tied as released), saved once;
  - chat records of realistic shapes (bench/chat_data.py: zh/en, prompts 20-600 tokens, responses 10-300) in
    ChatML; exactly steps x batch records, one epoch;
  - the same batches in the same order: TRL gets the dataset in rlhf_time's length-grouped batch order with
    sequential sampling, so per-step losses must agree (this also spares TRL most padding: its default random
    batches would pad more, so the speed ratios here are conservative);
  - AdamW lr 1e-5 (SFT: 1e-4), no warmup, no weight decay, clip 1.0, float32 (or bf16 autocast with --bf16),
    no gradient checkpointing, DPO sigmoid loss with beta 0.1 and a frozen reference copy.
GRPO (8 prompts x G = 8 completions per step by default): the chat records' prompts in file order (no shuffling
on either side), temperature 1, no top-k/top-p, up to --completion-tokens new tokens (the random model rarely stops,
so nearly every completion runs to the limit: the worst case for memory), reward `character_variety`
(bench/chat_data.py) for both, DAPO aggregation, group scaling, epsilon 0.2, mu = 1, no KL (TRL's default beta 0),
AdamW 1e-6 constant, clip 1.0. TRL generates the step's 64 completions in one batch and trains on them in
micro-batches of --trl-micro-batch completions (accumulated to one optimiser step; one batch of 64 would need
64 x 257 x 151,936 float32 logits, 10 GB per copy); rlhf_time trains on the step in its default way (one
micro-batch of 8 prompts x 8 completions, the prompt read once per group, log-probs from chunked hidden states).
Reported: tokens/s (SFT) or pairs/s (DPO) over the steps (first step start to last step end), peak memory
(CPU: the process's peak RSS; CUDA: torch.cuda.max_memory_allocated), per-step losses, DPO reward accuracy; GRPO: sampled tokens/s and steps/s, generation's share of the time, the
mean reward and completion length per step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from chat_data import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, make_chat_records, make_preference_pairs
from toolkit import (QWEN3_SHAPES, QWEN3_VOCAB, ROOT, SEED, ChildFailed, StepClock, finish_child, markdown_table, run_child,
                     save_qwen3, training_config, write_results)

MODELS = tuple(QWEN3_SHAPES)  # untied heads, 0.6b tied as released
VARIANTS = {
    "sft": {"rlhf_time": "rlhf_time default", "trl": "TRL SFTTrainer", "trl_padding_free": "TRL SFTTrainer padding_free",
            "rlhf_time_compile": "rlhf_time torch_compile=true",
            "rlhf_time_chunk32": "rlhf_time loss_chunk_bytes 32 MiB", "rlhf_time_chunk512": "rlhf_time loss_chunk_bytes 512 MiB"},
    "dpo": {"rlhf_time": "rlhf_time DPO (reference copy)", "rlhf_time_precompute": "rlhf_time DPO precompute_ref_logps",
            "trl": "TRL DPOTrainer (reference copy)"},
    "grpo": {"rlhf_time": "rlhf_time GRPO", "rlhf_time_micro": "rlhf_time GRPO, sample_together, micro-batches of 1 prompt x G",
             "trl": "TRL GRPOTrainer"},
    "ppo": {"rlhf_time": "rlhf_time PPO", "plain": "plain PPO loop (bench/plain_ppo.py)"},
}
BASELINE = {"sft": "trl", "dpo": "trl", "grpo": "trl", "ppo": "plain"}  # what each ratio is against
BETA = 0.1


# ------------------------------------------------------------------------------------------- set-up
def rlhf_time_config(work: Path, args, **overrides):
    fields = dict(experiment_name=overrides.pop("name", "run"), train_file=str(work / "train.jsonl"),
                  prompt_template=PROMPT_TEMPLATE, response_template=RESPONSE_TEMPLATE, max_seq_length=2048,
                  batch_size=args.batch_size, max_steps=args.steps, num_train_epochs=1, learning_rate=learning_rate(args),
                  lr_scheduler_type="linear", warmup_steps_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                  plot_metrics=True, device=args.device, use_amp=args.bf16, stage=args.stage)
    return training_config(work, **{**fields, **overrides})


def learning_rate(args) -> float:
    return {"sft": 1e-4, "dpo": 1e-5}.get(args.stage, 1e-6)


REWARD = f"{ROOT / 'bench' / 'chat_data.py'}:character_variety"
GROUP = 8  # completions per prompt (G)


def prepare(work: Path, args) -> dict:
    """Data, model, rlhf_time's tokenised examples and batch order, and the tokenizer identity check."""
    from qwen_vocab import load_qwen_tokenizer, token_identity

    from rlhf_time.data import load_preference_dataset, load_sft_dataset, plan_batches

    tokenizer = load_qwen_tokenizer()
    count = args.steps * args.batch_size
    if args.stage in ("grpo", "ppo"):
        return prepare_prompts(work, args, tokenizer, count)
    if args.stage == "sft":
        records = make_chat_records(count, tokenizer, seed=SEED)
        texts = [r[k] for r in records for k in ("prompt", "response")]
    else:
        records = make_preference_pairs(count, tokenizer, seed=SEED)
        texts = [r[k] for r in records for k in ("prompt", "chosen", "rejected")]
    (work / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    identity = token_identity(tokenizer, texts)
    config = rlhf_time_config(work, args)
    loader = load_sft_dataset if args.stage == "sft" else load_preference_dataset
    dataset = loader(str(work / "train.jsonl"), tokenizer, config, cache_dir=str(work / "prep"))
    examples = [dict(dataset[i]) for i in range(len(dataset))]
    plan = plan_batches(dataset.lengths, batch_size=args.batch_size, group_by_length=True, shuffle=True, seed=SEED)
    (work / "examples.json").write_text(json.dumps(examples))
    (work / "order.json").write_text(json.dumps([i for batch in plan for i in batch]))
    parameters = save_qwen3(work / "model", args.model, tokenizer, max_position_embeddings=max(2048, max(dataset.lengths)))
    if args.stage == "sft":
        tokens = sum(len(e["input_ids"]) for e in examples)
        targets = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    else:
        tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
        targets = sum(sum(t != -100 for t in e[k][1:]) for e in examples for k in ("chosen_labels", "rejected_labels"))
    return {"parameters": parameters, "tokens": tokens, "target_tokens": targets, "examples": len(examples),
            "max_length": max(dataset.lengths), "tokenizer_identity": identity}


def prepare_prompts(work: Path, args, tokenizer, count: int) -> dict:
    """GRPO and PPO: `count` chat prompts (steps x prompts per step, in file order) and the model."""
    from qwen_vocab import token_identity

    prompts = [{"prompt": r["prompt"]} for r in make_chat_records(count, tokenizer, seed=SEED, prompt_tokens=args.prompt_tokens)]
    (work / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts))
    lengths = [len(tokenizer.encode(PROMPT_TEMPLATE.format(prompt=r["prompt"]), add_special_tokens=False)) for r in prompts]
    parameters = save_qwen3(work / "model", args.model, tokenizer,
                            max_position_embeddings=max(2048, max(lengths) + args.completion_tokens))
    return {"parameters": parameters, "examples": count, "prompt_tokens": sum(lengths), "max_length": max(lengths),
            "tokenizer_identity": token_identity(tokenizer, [r["prompt"] for r in prompts])}


# ------------------------------------------------------------------------------------------ variants
def run_rlhf_time(work: Path, args, precompute: bool = False, compile: bool = False, chunk_mib: Optional[int] = None) -> dict:
    from rlhf_time.stages.dpo import DPOTrainer
    from rlhf_time.stages.sft import SFTrainer

    clock, reference_seconds = StepClock(), [0.0]
    if precompute:  # the up-front reference pass is part of the cost: timed and added
        original = DPOTrainer._reference_logps_of

        def timed(self, dataset):
            begin = time.perf_counter()
            out = original(self, dataset)
            reference_seconds[0] += time.perf_counter() - begin
            return out

        DPOTrainer._reference_logps_of = timed
    trainer_class = SFTrainer if args.stage == "sft" else DPOTrainer
    extra = dict(dpo={"beta": BETA, "precompute_ref_logps": precompute}) if args.stage == "dpo" else {}
    if chunk_mib:  # otherwise the default budget
        extra["loss_chunk_bytes"] = chunk_mib * 2**20
    trainer = trainer_class(rlhf_time_config(work, args, name=f"rt_{precompute}_{compile}_{chunk_mib}", torch_compile=compile, **extra))
    trainer.callbacks.append(clock.rlhf_time_callback())
    trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/loss" in row]
    return {"seconds": clock.seconds + reference_seconds[0], "reference_seconds": reference_seconds[0],
            "step_ends": clock.step_ends, "loss_chunk_bytes": trainer.config.loss_chunk_bytes,
            "losses": [row["train/loss"] for row in steps],
            "accuracies": [row.get("train/rewards/accuracies") for row in steps]}


def train_on_policy(trainer_class, config) -> dict:
    """An rlhf_time on-policy run timed step by step, with the time its sampling took; per-step reward and length."""
    generation = [0.0]

    class Timed(trainer_class):
        def sample_rollout(self, *a, **k):
            begin = time.perf_counter()
            rollout = super().sample_rollout(*a, **k)
            generation[0] += time.perf_counter() - begin
            return rollout

    trainer = Timed(config)
    clock = StepClock()
    trainer.callbacks.append(clock.rlhf_time_callback())
    trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/reward" in row]
    return {"seconds": clock.seconds, "generation_seconds": generation[0], "step_ends": clock.step_ends,
            "rewards": [row["train/reward"] for row in steps],
            "completion_lengths": [row["train/completions/mean_length"] for row in steps]}


def on_policy_config(work: Path, args, **fields):
    """rlhf_time_config with the sampling and reward both RL stages share (prompts in file order)."""
    return rlhf_time_config(
        work, args, lr_scheduler_type="constant", shuffle=False, group_by_length=False, temperature=1.0, top_k=0,
        top_p=1.0, **{**fields, "rollout": {"max_prompt_length": 2048, "max_completion_length": args.completion_tokens,
                                            "reward_funcs": [REWARD], **fields.get("rollout", {})}})


def run_rlhf_time_grpo(work: Path, args, micro: bool = False) -> dict:
    """micro: the step's completions sampled in one batch (rollout.sample_together), then trained on one prompt's G
    completions at a time (gradients accumulated to one optimiser step): TRL's layout, the same rows per forward as
    its micro-batch at G = 8."""
    from rlhf_time.stages.grpo import GRPOTrainer

    layout = dict(batch_size=1, gradient_accumulation_steps=args.batch_size) if micro else {}
    return train_on_policy(GRPOTrainer, on_policy_config(
        work, args, name="rt_grpo_micro" if micro else "rt_grpo", grpo={"num_generations": GROUP, "loss_type": "dapo"},
        rollout={"sample_together": micro}, **layout))


def run_rlhf_time_ppo(work: Path, args) -> dict:
    from rlhf_time.stages.ppo import PPOTrainer

    return train_on_policy(PPOTrainer, on_policy_config(
        work, args, name="rt_ppo", batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch))


def run_plain_ppo(work: Path, args) -> dict:
    import plain_ppo
    from chat_data import character_variety

    prompts = [PROMPT_TEMPLATE.format(prompt=json.loads(line)["prompt"])
               for line in (work / "train.jsonl").read_text().splitlines()]
    clock = StepClock()
    result = plain_ppo.train(str(work / "model"), prompts, character_variety, steps=args.steps,
                             prompts_per_step=args.batch_size, micro_batch=args.micro_batch,
                             max_new_tokens=args.completion_tokens, learning_rate=learning_rate(args), clock=clock)
    return {"seconds": clock.seconds, "step_ends": clock.step_ends, **result}


def run_trl_grpo(work: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from chat_data import character_variety

    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=json.loads(line)["prompt"])}
            for line in (work / "train.jsonl").read_text().splitlines()]
    completions_per_step = args.batch_size * GROUP
    common = trl_common(work, args)
    for key in ("train_sampling_strategy", "per_device_train_batch_size"):
        common.pop(key)
    config = GRPOConfig(
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=completions_per_step // args.micro_batch,
        num_generations=GROUP, max_completion_length=args.completion_tokens, temperature=1.0, top_k=0, top_p=1.0,
        loss_type="dapo", scale_rewards="group", beta=0.0, epsilon=0.2, num_iterations=1, shuffle_dataset=False,
        **{**common, "lr_scheduler_type": "constant"})
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa"),
                          reward_funcs=[character_variety], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(work / "model"))
    generate, generation = trainer.model.generate, [0.0]

    def timed_generate(*a, **k):
        begin = time.perf_counter()
        out = generate(*a, **k)
        generation[0] += time.perf_counter() - begin
        return out

    trainer.model.generate = timed_generate
    clock, log = train_trl(trainer)
    return {"seconds": clock.seconds, "generation_seconds": generation[0], "step_ends": clock.step_ends,
            "losses": [row["loss"] for row in log], "rewards": [row["reward"] for row in log],
            "completion_lengths": [row["completions/mean_length"] for row in log]}


def trl_common(work: Path, args) -> dict:
    # TRL's defaults, except: precision and activation checkpointing set as rlhf_time's (TRL defaults to bf16
    # and gradient checkpointing), our batch order with sequential sampling, no saving, no warmup.
    return dict(output_dir=str(work / "trl_out"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=learning_rate(args), lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", bf16=args.bf16,
                gradient_checkpointing=False, seed=SEED, data_seed=SEED, disable_tqdm=True,
                use_cpu=args.device == "cpu", train_sampling_strategy="sequential")


def trl_trainer(work: Path, args, trainer_class, config_class, rows: list[dict], **options):
    """A TRL trainer on the saved model with `rows` as its dataset: TRL's defaults but for trl_common's settings."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    config = config_class(max_length=None, **options, **trl_common(work, args))
    return trainer_class(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(work / "model"))


def in_batch_order(work: Path, name: str) -> list[dict]:
    """The rows of work/<name> (train.jsonl: the records; examples.json: rlhf_time's tokenised examples) in
    rlhf_time's batch order."""
    text = (work / name).read_text()
    rows = [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)
    return [rows[i] for i in json.loads((work / "order.json").read_text())]


def train_trl(trainer) -> tuple[StepClock, list[dict]]:
    """Train a TRL trainer under the step clock; its logged rows with a loss."""
    clock = StepClock()
    trainer.add_callback(clock.transformers_callback())
    trainer.train()
    return clock, [row for row in trainer.state.log_history if "loss" in row]


def run_trl_sft(work: Path, args, padding_free: bool) -> dict:
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "completion": RESPONSE_TEMPLATE.format(response=r["response"])}
            for r in in_batch_order(work, "train.jsonl")]
    trainer = trl_trainer(work, args, SFTTrainer, SFTConfig, rows, padding_free=padding_free)
    same = sum(row["input_ids"] == e["input_ids"] and list(row["labels"]) == e["labels"]
               for row, e in zip(trainer.train_dataset, in_batch_order(work, "examples.json")))
    clock, log = train_trl(trainer)
    return {"seconds": clock.seconds, "losses": [row["loss"] for row in log], "identical_examples": same,
            "step_ends": clock.step_ends}


def run_trl_dpo(work: Path, args) -> dict:
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in in_batch_order(work, "train.jsonl")]
    trainer = trl_trainer(work, args, DPOTrainer, DPOConfig, rows, beta=BETA)
    same = 0
    for row, e in zip(trainer.train_dataset, in_batch_order(work, "examples.json")):
        prompt = list(row["prompt_ids"])
        # same tokens, and the trained positions are exactly the completion (+ eos) after the prompt
        same += all(prompt + list(row[f"{side}_ids"]) == e[f"{side}_input_ids"]
                    and [t != -100 for t in e[f"{side}_labels"]] == [i >= len(prompt) for i in range(len(e[f"{side}_labels"]))]
                    for side in ("chosen", "rejected"))
    clock, log = train_trl(trainer)
    return {"seconds": clock.seconds, "losses": [row["loss"] for row in log], "identical_examples": same,
            "accuracies": [row.get("rewards/accuracies") for row in log], "step_ends": clock.step_ends}


def run_variant(name: str, work: Path, args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if args.stage == "grpo":
        result = run_trl_grpo(work, args) if name == "trl" else run_rlhf_time_grpo(work, args, micro=name.endswith("micro"))
    elif args.stage == "ppo":
        result = run_rlhf_time_ppo(work, args) if name == "rlhf_time" else run_plain_ppo(work, args)
    elif name.startswith("rlhf_time"):
        chunk = re.search(r"chunk(\d+)$", name)
        result = run_rlhf_time(work, args, precompute=name.endswith("precompute"), compile=name.endswith("compile"),
                               chunk_mib=int(chunk.group(1)) if chunk else None)
    elif args.stage == "sft":
        result = run_trl_sft(work, args, padding_free=name.endswith("padding_free"))
    else:
        result = run_trl_dpo(work, args)
    finish_child(result, work / f"{name}.json", args.device)


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=tuple(VARIANTS))
    parser.add_argument("--model", choices=MODELS, default="256x4")
    parser.add_argument("--steps", type=int, help="optimiser steps; 10 (SFT, DPO) or 3 (GRPO) by default")
    parser.add_argument("--batch-size", type=int, help="examples (SFT), pairs (DPO) or prompts (GRPO) per step; 8 / 4 / 8 by default")
    parser.add_argument("--completion-tokens", type=int, default=256, help="GRPO, PPO: max_completion_length")
    parser.add_argument("--prompt-tokens", type=lambda text: tuple(map(int, text.split(","))), default=(20, 600),
                        help="GRPO, PPO: MIN,MAX prompt tokens (chat_data's realistic 20,600 by default)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="completions per forward/backward: TRL's in GRPO; rlhf_time's and the plain loop's in PPO")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant")
    parser.add_argument("--variants", help="comma-separated subset of the stage's variants")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or {"sft": 8, "dpo": 4, "grpo": 8, "ppo": 64}[args.stage]
    args.steps = args.steps or (3 if args.stage in ("grpo", "ppo") else 10)
    return args


def main() -> None:
    args = parse_args()
    if args.variant:
        return run_variant(args.variant, Path(args.work), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = (args.variants or ",".join(VARIANTS[args.stage])).split(",")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        shared = prepare(work, args)
        print(f"prepared: {json.dumps(shared)}", flush=True)
        results = {}
        for name in names:
            command = [sys.executable, __file__, args.stage, "--variant", name, "--work", str(work),
                       "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--threads", str(args.threads), "--device", args.device,
                       "--completion-tokens", str(args.completion_tokens),
                       "--prompt-tokens", ",".join(map(str, args.prompt_tokens)), "--micro-batch", str(args.micro_batch)
                       ] + (["--bf16"] if args.bf16 else [])
            try:
                results[name] = run_child(command, work / f"{name}.json")
            except ChildFailed as error:
                print(f"{name} failed:\n{error}", file=sys.stderr)
                continue
            print(f"{name}: {results[name]['seconds']:.1f} s, {results[name]['peak_memory_gb']:.2f} GB", flush=True)
    report(results, shared, args, out)


def report_on_policy(results: dict, shared: dict, args, out: Path) -> None:
    """GRPO's table against TRL, PPO's against the plain loop: time per step, sampled tokens/s, peak memory."""
    base_name = BASELINE[args.stage]
    base = results.get(base_name, {})
    memory_kind = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    group = GROUP if args.stage == "grpo" else 1
    completions = args.batch_size * group
    shape = f"{args.batch_size} prompts x G {GROUP}" if args.stage == "grpo" else f"{args.batch_size} prompts"
    lines = [f"{args.stage.upper()}, model {args.model} ({shared['parameters'] / 1e6:.1f}M parameters, vocabulary "
             f"{QWEN3_VOCAB:,}), {args.steps} steps x {shape}, up to {args.completion_tokens} new tokens, "
             f"{shared['prompt_tokens']:,} prompt tokens (longest {shared['max_length']}), {args.device}, "
             f"{'bf16 autocast' if args.bf16 else 'float32'}, {args.threads} threads; micro-batches of "
             f"{args.micro_batch} completions ({'TRL' if args.stage == 'grpo' else 'both'})", ""]
    versus = "TRL" if base_name == "trl" else "plain"
    header = ["variant", "s/step", f"steps/s vs {versus}", "sampled tokens/s", "generation share",
              f"{memory_kind} (GB)", f"vs {versus}", "mean reward", "mean completion length"]
    rows = []
    for name, r in results.items():
        sampled = sum(r["completion_lengths"]) * completions
        r["speed_vs_base"] = base["seconds"] / r["seconds"] if base else float("nan")
        r["memory_vs_base"] = r["peak_memory_gb"] / base["peak_memory_gb"] if base else float("nan")
        rows.append([VARIANTS[args.stage][name], f"{r['seconds'] / args.steps:.1f}", f"{r['speed_vs_base']:.2f}x",
                     f"{sampled / r['seconds']:.1f}", f"{r['generation_seconds'] / r['seconds']:.0%}",
                     f"{r['peak_memory_gb']:.2f}", f"{r['memory_vs_base']:.2f}x",
                     f"{sum(r['rewards']) / len(r['rewards']):.4f}",
                     f"{sum(r['completion_lengths']) / len(r['completion_lengths']):.1f}"])
    lines += markdown_table(header, rows)
    loads = ", ".join(f"{name} {r['load_average']:.1f}" for name, r in results.items())
    lines.append(f"load average at the end of each variant (shared machine): {loads}")
    write_results(out, f"{args.stage}_{args.model}_{args.device}", "\n".join(lines), {"shared": shared, "results": results, "args": vars(args)})


def report(results: dict, shared: dict, args, out: Path) -> None:
    if args.stage in ("grpo", "ppo"):
        return report_on_policy(results, shared, args, out)
    per_second = "tokens/s" if args.stage == "sft" else "pairs/s"
    work_done = shared["tokens"] if args.stage == "sft" else shared["examples"]
    trl = results.get("trl", {})
    memory_kind = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
    identity = shared["tokenizer_identity"]
    lines = [f"{args.stage.upper()}, model {args.model} ({shared['parameters'] / 1e6:.1f}M parameters, vocabulary "
             f"{QWEN3_VOCAB:,}), {args.steps} steps x batch {args.batch_size}, {shared['examples']} "
             f"{'examples' if args.stage == 'sft' else 'pairs'}, {shared['tokens']:,} tokens ({shared['target_tokens']:,} "
             f"trained on), longest {shared['max_length']}, {args.device}, {'bf16 autocast' if args.bf16 else 'float32'}, "
             f"{args.threads} threads",
             f"tokenizer: {identity['identical_texts']}/{identity['texts']} texts ({identity['tokens_compared']:,} tokens) "
             f"with token ids identical to the tiktoken reference; vocabulary {identity['vocab_size']:,}", ""]
    header = ["variant", per_second, "vs TRL", f"{memory_kind} (GB)", "vs TRL", "first loss", "last loss"]
    rows = []
    for name, r in results.items():
        r["rate"] = work_done / r["seconds"]
        r["speed_vs_trl"] = trl["seconds"] / r["seconds"] if trl else float("nan")
        r["memory_vs_trl"] = r["peak_memory_gb"] / trl["peak_memory_gb"] if trl else float("nan")
        rows.append([VARIANTS[args.stage][name], f"{r['rate']:,.{0 if args.stage == 'sft' else 2}f}",
                     f"{r['speed_vs_trl']:.2f}x", f"{r['peak_memory_gb']:.2f}", f"{r['memory_vs_trl']:.2f}x",
                     f"{r['losses'][0]:.4f}", f"{r['losses'][-1]:.4f}"])
        if args.stage == "dpo":
            accuracies = [a for a in r.get("accuracies", []) if a is not None]
            rows[-1].append(f"{sum(accuracies) / max(len(accuracies), 1):.2f}")
    lines += markdown_table(header + (["mean reward accuracy"] if args.stage == "dpo" else []), rows)
    for name, r in results.items():
        if "identical_examples" in r:
            lines.append(f"\n{VARIANTS[args.stage][name]}: examples identical to rlhf_time's (tokens and trained "
                         f"positions): {r['identical_examples']}/{shared['examples']}")
    if "rlhf_time" in results and trl:
        ours, theirs = results["rlhf_time"]["losses"], trl["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
        lines.append(f"per-step losses, rlhf_time vs TRL: largest relative difference {worst:.2%} over {len(theirs)} steps")
    if "rlhf_time_compile" in results and "rlhf_time" in results:
        steady = lambda r: (r["step_ends"][-1] - r["step_ends"][1]) / (len(r["step_ends"]) - 2)  # noqa: E731
        eager, compiled = results["rlhf_time"], results["rlhf_time_compile"]
        lines.append(f"torch_compile: first step {compiled['step_ends'][0]:.1f} s (eager {eager['step_ends'][0]:.1f} s), "
                     f"steps 3-{len(eager['step_ends'])} {steady(compiled):.1f} s/step (eager {steady(eager):.1f} s/step)")
    if "rlhf_time_precompute" in results:
        lines.append(f"precompute_ref_logps: the up-front reference pass took "
                     f"{results['rlhf_time_precompute']['reference_seconds']:.1f} s (included in its pairs/s)")
    loads = ", ".join(f"{name} {r['load_average']:.1f}" for name, r in results.items())
    lines.append(f"load average at the end of each variant (shared machine): {loads}")
    stem = f"{args.stage}_{args.model}_{args.device}"
    write_results(out, stem, "\n".join(lines), {"shared": shared, "results": results, "args": vars(args)})
    chart(results, args, out / f"{stem}.png", per_second, memory_kind)


def chart(results: dict, args, path: Path, per_second: str, memory_kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [VARIANTS[args.stage][n] for n in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].barh(labels, [r["rate"] for r in results.values()], color="tab:blue")
    axes[0].set_xlabel(per_second)
    axes[1].barh(labels, [r["peak_memory_gb"] for r in results.values()], color="tab:orange")
    axes[1].set_xlabel(f"{memory_kind} (GB)")
    for name, r in results.items():
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], label=VARIANTS[args.stage][name], marker=".")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("train loss")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{args.stage.upper()} {args.model}, vocabulary {QWEN3_VOCAB:,}, {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
