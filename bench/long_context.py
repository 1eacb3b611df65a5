"""Long context: the longest single SFT example rlhf_time and TRL each train within a memory cap, side by side.

    python bench/long_context.py [--lengths 1024,2048,4096,8192,16384,32768] [--cap-gb 8] [--steps 2] [--threads 1]
                                 [--libraries rlhf_time,trl] [--tiny] [--work DIR] [--out bench/out]

One SFT example per length L: a chat record (bench/chat_data.py: a ~32-token prompt, a response longer than L
tokens) cut to exactly L tokens by each library's own truncation (max_seq_length / max_length = L: both keep the
start), labels on the response. Batch 1, `--steps` AdamW steps on it (2 by default, so the optimiser state is
allocated while a step's activations are alive, as in any longer run), float32, gradient checkpointing on for both,
the 256 x 4 Qwen3 model at the real vocabulary (151,936 rows, untied head: 80.9M parameters) with
max_position_embeddings = the longest length, sdpa attention. `--tiny`: the 64 x 2 shape at the tiny tokenizer's
vocabulary, for the test.

Every (library, length) runs in its own process, lengths in increasing order, the two libraries alternating.
A watchdog polls each child's resident memory every 20 ms and kills it once it passes the cap (GiB), so the shared
machine never gives a run more; a killed run "does not fit", and that library tries no longer length. Reported per
run: peak RSS (from the kernel's rusage of the child, killed or not), seconds of train() (model loading and
tokenisation excluded), the per-step losses (the two libraries' must agree: same tokens, same positions trained,
same optimiser) and whether TRL tokenised the example to rlhf_time's tokens and trained positions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from chat_data import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, make_chat_records
from toolkit import QWEN3_VOCAB, ROOT, SEED, ChildFailed, StepClock, finish_child, markdown_table, save_qwen3, \
    training_config, write_results

from rlhf_time.runtime.throughput import process_memory_bytes  # noqa: E402  (toolkit put the repository on the path)

LIBRARIES = {"rlhf_time": "rlhf_time", "trl": "TRL"}
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
PROMPT_TOKENS = 32
LEARNING_RATE = 1e-4
POLL_SECONDS = 0.02
LOSS_TOLERANCE = 1e-4  # relative; float32 sums over different chunkings agree far closer


# ------------------------------------------------------------------------------------------- set-up
def load_tokenizer(tiny: bool):
    if tiny:
        from rlhf_time.models.tiny import load_tiny_tokenizer

        return load_tiny_tokenizer()
    from qwen_vocab import load_qwen_tokenizer

    return load_qwen_tokenizer()


def rlhf_time_config(work: Path, length: int, steps: int):
    """The config for `length` in work/L<length> (the model is work/model)."""
    return training_config(
        work / f"L{length}", model_name=str(work / "model"), experiment_name="long_context",
        train_file=str(work / f"L{length}" / "train.jsonl"), prompt_template=PROMPT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE, max_seq_length=length, batch_size=1, max_steps=steps, num_train_epochs=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps_ratio=0.0, weight_decay=0.0,
        max_grad_norm=1.0, use_gradient_checkpointing=True, device="cpu", stage="sft")


def prepare(work: Path, args) -> dict:
    """The model, and per length the record (`steps` copies: one per step) with rlhf_time's tokenised example."""
    from rlhf_time.data import load_sft_dataset

    tokenizer = load_tokenizer(args.tiny)
    shape, vocab = ("64x2", len(tokenizer)) if args.tiny else ("256x4", QWEN3_VOCAB)
    parameters = save_qwen3(work / "model", shape, tokenizer, vocab_size=vocab,
                            max_position_embeddings=max(args.lengths))
    for length in args.lengths:
        folder = work / f"L{length}"
        folder.mkdir(parents=True)
        # Counted sentence by sentence, so a margin makes sure the whole text has more than `length` tokens.
        record = make_chat_records(1, tokenizer, seed=SEED, prompt_tokens=(PROMPT_TOKENS, PROMPT_TOKENS),
                                   response_tokens=(length + length // 8 + 64,) * 2)[0]
        (folder / "train.jsonl").write_text((json.dumps(record, ensure_ascii=False) + "\n") * args.steps)
        dataset = load_sft_dataset(str(folder / "train.jsonl"), tokenizer, rlhf_time_config(work, length, args.steps),
                                   cache_dir=str(folder / "prep"))
        example = dict(dataset[0])
        prompt = example["labels"].index(next(label for label in example["labels"] if label != -100))
        # Both libraries keep the start of a longer text; rlhf_time would cut the prompt's left as well were fewer
        # than a quarter of the positions left for the response (rlhf_time.data.tokenize.truncate).
        if len(example["input_ids"]) != length or prompt > length - length // 4:
            raise RuntimeError(f"the example has {len(example['input_ids'])} tokens, {prompt} of them prompt: "
                               f"{length} is too short or the text too short")
        (folder / "example.json").write_text(json.dumps(example))
    return {"shape": shape, "vocab_size": vocab, "parameters": parameters}


# ------------------------------------------------------------------------------------------ variants
def run_rlhf_time(work: Path, length: int, steps: int) -> dict:
    from rlhf_time.stages.sft import SFTrainer

    clock = StepClock()
    trainer = SFTrainer(rlhf_time_config(work, length, steps))
    trainer.callbacks.append(clock.rlhf_time_callback())
    trainer.train()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": clock.seconds, "step_ends": clock.step_ends,
            "losses": [row["train/loss"] for row in rows if "train/loss" in row]}


def run_trl(work: Path, length: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = work / f"L{length}"
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    rows = [{"prompt": PROMPT_TEMPLATE.format(prompt=r["prompt"]), "completion": RESPONSE_TEMPLATE.format(response=r["response"])}
            for r in records]
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    # TRL's defaults (gradient checkpointing included), except float32, no saving, no warmup, rlhf_time's optimiser
    # settings, and the example cut to `length` tokens.
    config = SFTConfig(output_dir=str(folder / "trl_out"), max_length=length, per_device_train_batch_size=1,
                       max_steps=steps, learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0,
                       weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                       bf16=False, gradient_checkpointing=True, seed=SEED, data_seed=SEED, disable_tqdm=True,
                       use_cpu=True, train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(work / "model"))
    ours, row = json.loads((folder / "example.json").read_text()), trainer.train_dataset[0]
    same = row["input_ids"] == ours["input_ids"] and list(row["labels"]) == ours["labels"]
    clock = StepClock()
    trainer.add_callback(clock.transformers_callback())
    trainer.train()
    return {"seconds": clock.seconds, "step_ends": clock.step_ends, "identical_example": same,
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


def run_variant(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    run = run_rlhf_time if args.variant == "rlhf_time" else run_trl
    length = args.lengths[0]
    result = run(Path(args.work), length, args.steps)
    finish_child(result, Path(args.work) / f"L{length}" / f"{args.variant}.json")


# -------------------------------------------------------------------------------------- measurement
def high_water_bytes(pid: int) -> int:
    """The peak resident memory of process `pid` since it started its program (VmHWM; 0 once it is gone).

    Not the rusage a parent gets from wait4: Linux carries the peak of the process's memory before exec into it,
    and a child forked (vfork) from a large parent, such as a pytest worker, would report the parent's peak."""
    return process_memory_bytes("VmHWM", pid) or 0


def run_capped(command: list[str], result: Path, cap_bytes: int, *, timeout: float, env: dict | None = None) -> dict:
    """Run `command` in a fresh process, as toolkit.run_child does, killing it once its peak resident memory passes
    `cap_bytes` (polled every POLL_SECONDS) or it runs past `timeout` seconds. Returns the result the child wrote,
    or {"fits": False, "killed": reason, "peak_memory_gb": the child's peak RSS} for a killed child."""
    log = result.with_suffix(".log")
    with open(log, "w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    begin, killed, peak = time.monotonic(), None, 0
    while True:
        pid, status, _ = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, high_water_bytes(child.pid))  # a high-water mark: a spike between two polls is kept
        if killed is None and peak > cap_bytes:
            killed = f"resident memory passed {cap_bytes / 2**30:g} GiB"
        elif killed is None and time.monotonic() - begin > timeout:
            killed = f"ran past {timeout:.0f} s"
        if killed is not None:
            child.kill()
            pid, status, _ = os.wait4(child.pid, 0)
            break
        time.sleep(POLL_SECONDS)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    peak_gb = peak / 2**30
    if killed is not None:
        return {"fits": False, "killed": killed, "peak_memory_gb": peak_gb, "seconds": time.monotonic() - begin}
    if child.returncode:
        raise ChildFailed(log.read_text()[-3000:])
    measured = json.loads(result.read_text())
    measured["fits"] = max(peak_gb, measured.get("peak_memory_gb", 0.0)) <= cap_bytes / 2**30
    return measured


def child_command(args, library: str, length: int, work: Path) -> list[str]:
    return [sys.executable, __file__, "--variant", library, "--work", str(work), "--lengths", str(length),
            "--steps", str(args.steps), "--threads", str(args.threads)]


def measure(work: Path, args) -> dict:
    """{library: {length: result}}: lengths in increasing order, libraries alternating, a library stopping at its
    first run that does not fit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = {library: {} for library in args.libraries}
    for length in args.lengths:
        for library in args.libraries:
            runs = results[library]
            if runs and not runs[max(runs)]["fits"]:
                continue
            result_path = work / f"L{length}" / f"{library}.json"
            try:
                runs[length] = run_capped(child_command(args, library, length, work), result_path,
                                          int(args.cap_gb * 2**30), timeout=args.timeout_min * 60, env=env)
            except ChildFailed as error:
                print(f"{library} at {length} failed:\n{error}", file=sys.stderr)
                runs[length] = {"fits": False, "killed": "failed (see the log above)", "peak_memory_gb": float("nan")}
            r = runs[length]
            print(f"{library} {length}: {r['peak_memory_gb']:.2f} GB, {r.get('seconds', float('nan')):.1f} s, "
                  f"losses {r.get('losses')}{'' if r['fits'] else ', does not fit: ' + r['killed']}", flush=True)
    return results


# --------------------------------------------------------------------------------------- results
def longest_fitting(runs: dict) -> int | None:
    return max((length for length, r in runs.items() if r["fits"]), default=None)


def loss_agreement(ours: dict | None, theirs: dict | None) -> str:
    """'yes (largest relative difference x)' when both ran and every step's loss agrees, else why not."""
    if not (ours and theirs and ours["fits"] and theirs["fits"]):
        return "-"
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
    return f"{'yes' if worst <= LOSS_TOLERANCE else 'NO'} ({worst:.1e})"


def report(results: dict, shared: dict, args, out: Path) -> None:
    names = [LIBRARIES[library] for library in args.libraries]
    gb = lambda r: "-" if r is None else f"{r['peak_memory_gb']:.2f}" + ("" if r["fits"] else " (killed)")  # noqa: E731
    seconds = lambda r: f"{r['seconds']:.1f}" if r and r["fits"] else "-"  # noqa: E731
    rows = []
    for length in args.lengths:
        runs = [results[library].get(length) for library in args.libraries]
        if not any(runs):
            continue
        rows.append([f"{length:,}", *map(gb, runs), *map(seconds, runs),
                     loss_agreement(*runs) if len(runs) == 2 else "-"])
    header = ["length (tokens)", *(f"{n} peak RSS (GB)" for n in names), *(f"{n} s ({args.steps} steps)" for n in names),
              "losses equal (largest rel. diff.)"]
    lines = [f"SFT, one example of each length, batch 1, {args.steps} AdamW steps, float32, gradient checkpointing on "
             f"for both, model {shared['shape']} ({shared['parameters'] / 1e6:.1f}M parameters, vocabulary "
             f"{shared['vocab_size']:,}, untied head), sdpa, cpu, {args.threads} thread(s); cap {args.cap_gb:g} GiB "
             f"of resident memory per run (watchdog: a run past it is killed and the library stops)", ""]
    lines += markdown_table(header, rows)
    longest = {library: longest_fitting(results[library]) for library in args.libraries}
    missed = {library: any(not r["fits"] for r in results[library].values()) for library in args.libraries}
    lines.append("")
    for library in args.libraries:
        runs, fit = results[library], longest[library]
        ended = (f"first miss: {max(runs):,} ({runs[max(runs)]['killed']})" if missed[library]
                 else f"fits every length tried, {args.cap_gb - runs[fit]['peak_memory_gb']:.2f} GiB below the cap at "
                      f"{fit:,}: its limit lies beyond (not tried)")
        lines.append(f"{LIBRARIES[library]}: longest example within {args.cap_gb:g} GiB: "
                     f"{f'{fit:,} tokens' if fit else 'none'}; {ended}")
    if len(args.libraries) == 2 and all(longest.values()):
        (ours, theirs), (a, b) = (longest[library] for library in args.libraries), args.libraries
        if not missed[b]:
            lines.append(f"ratio {LIBRARIES[a]} / {LIBRARIES[b]}: not determined ({LIBRARIES[b]} fitted every length tried)")
        else:
            bound = "" if missed[a] else "at least "
            lines.append(f"ratio {LIBRARIES[a]} / {LIBRARIES[b]}: {bound}{ours / theirs:.1f}x")
    if "trl" in results:
        same = [r["identical_example"] for r in results["trl"].values() if "identical_example" in r]
        lines.append(f"TRL's tokenised example equals rlhf_time's (tokens and trained positions): {sum(same)}/{len(same)}")
    loads = ", ".join(f"{LIBRARIES[library]} {length}: {r['load_average']:.1f}" for library in args.libraries
                      for length, r in results[library].items() if "load_average" in r)
    lines.append(f"load average at the end of each run (shared machine): {loads}")
    stem = "long_context_tiny" if args.tiny else "long_context"
    write_results(out, stem, "\n".join(lines), {"shared": shared, "results": results, "longest": longest,
                                                "args": vars(args)})


# ------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="tokens, comma-separated")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="rlhf_time,trl or one of them")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="resident memory cap per run, GiB")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout-min", type=float, default=60.0, help="a run past it is killed (not a memory miss)")
    parser.add_argument("--tiny", action="store_true", help="the 64 x 2 shape at the tiny tokenizer's vocabulary")
    parser.add_argument("--work", help="keep the model, examples and logs here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = sorted(int(n) for n in args.lengths.split(","))
    args.libraries = args.libraries.split(",")
    return args


def main() -> None:
    args = parse_args()
    if args.variant:
        return run_variant(args)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(args.work or folder)
        work.mkdir(parents=True, exist_ok=True)
        shared = prepare(work, args)
        print(f"prepared: {json.dumps(shared)}", flush=True)
        results = measure(work, args)
    report(results, shared, args, Path(args.out))


if __name__ == "__main__":
    main()
