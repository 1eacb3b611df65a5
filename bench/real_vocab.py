"""SFT and DPO at Qwen's real vocabulary: rlhf_time against TRL, same model, same examples, same batches.

    python bench/real_vocab.py sft [--model 256x4|512x8|0.6b] [--steps 10] [--batch-size 8] [--device cpu|cuda] [--bf16]
    python bench/real_vocab.py dpo [--model 256x4] [--steps 10] [--batch-size 4] ...

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
Reported: tokens/s (SFT) or pairs/s (DPO) over the steps (first step start to last step end), peak memory
(CPU: the process's peak RSS; CUDA: torch.cuda.max_memory_allocated), per-step losses, DPO reward accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from chat_data import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, make_chat_records, make_preference_pairs  # noqa: E402

MODELS = {
    "256x4": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
    "512x8": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
QWEN3_VOCAB = 151_936  # Qwen3's embedding rows (the tokenizer's 151,669 padded to a multiple of 128)
VARIANTS = {
    "sft": {"rlhf_time": "rlhf_time default", "trl": "TRL SFTTrainer", "trl_padding_free": "TRL SFTTrainer padding_free",
            "rlhf_time_compile": "rlhf_time torch_compile=true"},
    "dpo": {"rlhf_time": "rlhf_time DPO (reference copy)", "rlhf_time_precompute": "rlhf_time DPO precompute_ref_logps",
            "trl": "TRL DPOTrainer (reference copy)"},
}
SEED, BETA = 0, 0.1


# ------------------------------------------------------------------------------------------- set-up
def build_model(size: str, folder: Path, tokenizer, max_length: int) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=QWEN3_VOCAB, max_position_embeddings=max(2048, max_length), rope_theta=1e6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **MODELS[size])
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def rlhf_time_config(work: Path, args, **overrides):
    from rlhf_time import TrainingConfig

    return TrainingConfig(
        experiment_name=overrides.pop("name", "run"), output_dir=str(work / "runs"), model_name=str(work / "model"),
        model_type="Qwen", train_file=str(work / "train.jsonl"), prompt_template=PROMPT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE, max_seq_length=2048, batch_size=args.batch_size, max_steps=args.steps,
        num_train_epochs=1, learning_rate=learning_rate(args), lr_scheduler_type="linear", warmup_steps_ratio=0.0,
        weight_decay=0.0, max_grad_norm=1.0, eval_strategy="no", save_strategy="no", report_to="none",
        disable_progress_bar=True, logging_steps=1, seed=SEED, data_cache_dir=str(work / "cache"),
        device=args.device, use_amp=args.bf16, stage=args.stage, **overrides)


def learning_rate(args) -> float:
    return 1e-4 if args.stage == "sft" else 1e-5


def prepare(work: Path, args) -> dict:
    """Data, model, rlhf_time's tokenised examples and batch order, and the tokenizer identity check."""
    from qwen_vocab import load_qwen_tokenizer, token_identity

    from rlhf_time.data import load_preference_dataset, load_sft_dataset, plan_batches

    tokenizer = load_qwen_tokenizer()
    count = args.steps * args.batch_size
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
    parameters = build_model(args.model, work / "model", tokenizer, max(dataset.lengths))
    if args.stage == "sft":
        tokens = sum(len(e["input_ids"]) for e in examples)
        targets = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    else:
        tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
        targets = sum(sum(t != -100 for t in e[k][1:]) for e in examples for k in ("chosen_labels", "rejected_labels"))
    return {"parameters": parameters, "tokens": tokens, "target_tokens": targets, "examples": len(examples),
            "max_length": max(dataset.lengths), "tokenizer_identity": identity}


# ------------------------------------------------------------------------------------------ variants
class StepClock:
    """Wall time from the first step's start (train begin) to the last step's end, the same for every variant."""

    def __init__(self) -> None:
        self.begin = self.end = None
        self.step_ends: list[float] = []  # seconds since train begin

    def start(self) -> None:
        self._sync()
        self.begin = time.perf_counter()

    def step(self) -> None:
        self._sync()
        self.end = time.perf_counter()
        self.step_ends.append(self.end - self.begin)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @property
    def seconds(self) -> float:
        return self.end - self.begin


def run_rlhf_time(work: Path, args, precompute: bool = False, compile: bool = False) -> dict:
    from rlhf_time.runtime.callbacks import TrainerCallback
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
    trainer = trainer_class(rlhf_time_config(work, args, name=f"rt_{precompute}", torch_compile=compile, **extra))

    class Clock(TrainerCallback):
        def on_train_begin(self, trainer):
            clock.start()

        def on_step_end(self, trainer, metrics):
            clock.step()

    trainer.callbacks.append(Clock())
    trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/loss" in row]
    return {"seconds": clock.seconds + reference_seconds[0], "reference_seconds": reference_seconds[0],
            "step_ends": clock.step_ends,
            "losses": [row["train/loss"] for row in steps],
            "accuracies": [row.get("train/rewards/accuracies") for row in steps]}


def trl_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.step()

    return Clock()


def trl_common(work: Path, args) -> dict:
    # TRL's defaults, except: precision and activation checkpointing set as rlhf_time's (TRL defaults to bf16
    # and gradient checkpointing), our batch order with sequential sampling, no saving, no warmup.
    return dict(output_dir=str(work / "trl_out"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=learning_rate(args), lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", bf16=args.bf16,
                gradient_checkpointing=False, seed=SEED, data_seed=SEED, disable_tqdm=True,
                use_cpu=args.device == "cpu", train_sampling_strategy="sequential")


def trl_model(work: Path, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(work / "model")


def ordered_records(work: Path) -> list[dict]:
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    return [records[i] for i in json.loads((work / "order.json").read_text())]


def run_trl_sft(work: Path, args, padding_free: bool) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "completion": RESPONSE_TEMPLATE.format(response=r["response"])}
            for r in ordered_records(work)]
    model, tokenizer = trl_model(work, args)
    config = SFTConfig(max_length=None, padding_free=padding_free, **trl_common(work, args))
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    reference = json.loads((work / "examples.json").read_text())
    ours = [reference[i] for i in json.loads((work / "order.json").read_text())]
    same = sum(row["input_ids"] == e["input_ids"] and list(row["labels"]) == e["labels"]
               for row, e in zip(trainer.train_dataset, ours))
    clock = StepClock()
    trainer.add_callback(trl_callback(clock))
    trainer.train()
    log = [row for row in trainer.state.log_history if "loss" in row]
    return {"seconds": clock.seconds, "losses": [row["loss"] for row in log], "identical_examples": same,
            "step_ends": clock.step_ends}


def run_trl_dpo(work: Path, args) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in ordered_records(work)]
    model, tokenizer = trl_model(work, args)
    config = DPOConfig(beta=BETA, max_length=None, **trl_common(work, args))
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    reference = json.loads((work / "examples.json").read_text())
    ours = [reference[i] for i in json.loads((work / "order.json").read_text())]
    same = 0
    for row, e in zip(trainer.train_dataset, ours):
        prompt = list(row["prompt_ids"])
        # same tokens, and the trained positions are exactly the completion (+ eos) after the prompt
        same += all(prompt + list(row[f"{side}_ids"]) == e[f"{side}_input_ids"]
                    and [t != -100 for t in e[f"{side}_labels"]] == [i >= len(prompt) for i in range(len(e[f"{side}_labels"]))]
                    for side in ("chosen", "rejected"))
    clock = StepClock()
    trainer.add_callback(trl_callback(clock))
    trainer.train()
    log = [row for row in trainer.state.log_history if "loss" in row]
    return {"seconds": clock.seconds, "losses": [row["loss"] for row in log], "identical_examples": same,
            "accuracies": [row.get("rewards/accuracies") for row in log], "step_ends": clock.step_ends}


def run_variant(name: str, work: Path, args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if name.startswith("rlhf_time"):
        result = run_rlhf_time(work, args, precompute=name.endswith("precompute"), compile=name.endswith("compile"))
    elif args.stage == "sft":
        result = run_trl_sft(work, args, padding_free=name.endswith("padding_free"))
    else:
        result = run_trl_dpo(work, args)
    if args.device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load_average"] = os.getloadavg()[0]
    (work / f"{name}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("sft", "dpo"))
    parser.add_argument("--model", choices=sorted(MODELS), default="256x4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="examples (SFT) or pairs (DPO) per step; 8 / 4 by default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant")
    parser.add_argument("--variants", help="comma-separated subset of the stage's variants")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.stage == "sft" else 4)
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
                       "--threads", str(args.threads), "--device", args.device] + (["--bf16"] if args.bf16 else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[name] = json.loads((work / f"{name}.json").read_text())
            print(f"{name}: {results[name]['seconds']:.1f} s, {results[name]['peak_memory_gb']:.2f} GB", flush=True)
    report(results, shared, args, out)


def report(results: dict, shared: dict, args, out: Path) -> None:
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
             f"with token ids identical to the tiktoken reference; vocabulary {identity['vocab_size']:,}",
             "", f"| variant | {per_second} | vs TRL | {memory_kind} (GB) | vs TRL | first loss | last loss |"
             + (" mean reward accuracy |" if args.stage == "dpo" else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.stage == "dpo" else "")]
    for name, r in results.items():
        r["rate"] = work_done / r["seconds"]
        r["speed_vs_trl"] = trl["seconds"] / r["seconds"] if trl else float("nan")
        r["memory_vs_trl"] = r["peak_memory_gb"] / trl["peak_memory_gb"] if trl else float("nan")
        row = (f"| {VARIANTS[args.stage][name]} | {r['rate']:,.{0 if args.stage == 'sft' else 2}f} | {r['speed_vs_trl']:.2f}x | "
               f"{r['peak_memory_gb']:.2f} | {r['memory_vs_trl']:.2f}x | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
        if args.stage == "dpo":
            accuracies = [a for a in r.get("accuracies", []) if a is not None]
            row += f" {sum(accuracies) / max(len(accuracies), 1):.2f} |"
        lines.append(row)
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
    text = "\n".join(lines)
    print(text)
    stem = f"{args.stage}_{args.model}_{args.device}"
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"shared": shared, "results": results, "args": vars(args)}, indent=1))
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
