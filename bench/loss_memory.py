"""Peak memory of the SFT loss step with a Qwen-sized vocabulary: plain logits against the chunked loss.

    python bench/loss_memory.py [--vocab 151936] [--hidden 512] [--tokens 1024,2048,4096] [--chunks 256,1024,4096]

One loss step = forward and backward of the response cross-entropy from final hidden states (N target
positions, H) through the LM head (V, H):
  - plain:   logits = hidden @ W^T (N x V, float32), torch.nn.functional.cross_entropy, backward;
  - chunked: rlhf_time.loss.chunked_sft_loss(chunk_size=C), the path SFTrainer takes.
Each measurement runs in a fresh subprocess; reported is the peak resident memory above what the process held
once the inputs existed (VmHWM - VmRSS from /proc/self/status), so the inputs themselves (hidden states, W) are
not counted, the gradient buffers are. Both losses are checked to agree. Writes results to --out as JSON/markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(method: str, vocab: int, hidden_size: int, tokens: int, chunk: int) -> dict:
    from rlhf_time.loss.logps import chunked_sft_loss

    torch.manual_seed(0)
    hidden = (torch.randn(1, tokens + 1, hidden_size) * 0.5).requires_grad_()  # +1: the last position predicts nothing
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens + 1))
    reset_peak()
    before, start = memory_kb("VmRSS"), time.perf_counter()
    if method == "plain":
        logits = hidden[:, :-1] @ weight.T  # (1, N, V) float32
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    else:
        loss = chunked_sft_loss(hidden, weight, labels, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_gb = (memory_kb("VmHWM") - before) / 2**20
    return {"method": method, "tokens": tokens, "chunk": chunk, "peak_extra_gb": peak_gb, "seconds": seconds,
            "loss": float(loss), "grad_weight_norm": float(weight.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", default="1024,2048,4096")
    parser.add_argument("--chunks", default="256,1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method:tokens:chunk, run in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        method, tokens, chunk = args.one.split(":")
        print(json.dumps(measure(method, args.vocab, args.hidden, int(tokens), int(chunk))))
        return

    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for method, chunk in [("plain", 0)] + [("chunked", c) for c in chunks]:
            command = [sys.executable, __file__, "--one", f"{method}:{tokens}:{chunk}", "--vocab", str(args.vocab),
                       "--hidden", str(args.hidden), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report(rows, chunks, args)


def report(rows: list[dict], chunks: list[int], args) -> None:
    logits_gb = lambda n: n * args.vocab * 4 / 2**30  # noqa: E731
    weight_gb = args.vocab * args.hidden * 4 / 2**30
    lines = [f"vocabulary {args.vocab:,}, hidden {args.hidden}: one float32 N x V logits tensor = N x "
             f"{args.vocab * 4 / 2**20:.2f} MB; the LM head's gradient alone = {weight_gb:.2f} GB", "",
             "| target tokens N | N x V float32 logits (GB) | plain: peak extra (GB) | "
             + " | ".join(f"chunked C={c}: peak extra (GB)" for c in chunks) + " | max loss difference |",
             "|---:|---:|---:|" + "---:|" * len(chunks) + "---:|"]
    for tokens in sorted({r["tokens"] for r in rows}):
        plain = next(r for r in rows if r["tokens"] == tokens and r["method"] == "plain")
        chunked = [next(r for r in rows if r["tokens"] == tokens and r["chunk"] == c) for c in chunks]
        difference = max(abs(r["loss"] - plain["loss"]) for r in chunked)
        lines.append(f"| {tokens:,} | {logits_gb(tokens):.2f} | {plain['peak_extra_gb']:.2f} | "
                     + " | ".join(f"{r['peak_extra_gb']:.2f}" for r in chunked) + f" | {difference:.1e} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_memory.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "loss_memory.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
