"""Peak memory of the SFT loss step with a Qwen-sized vocabulary: plain logits against the chunked loss.

    python bench/loss_memory.py [--vocab 151936] [--hidden 512] [--tokens 1024,2048,4096] [--chunks 256,1024,4096]
    python bench/loss_memory.py --vocabs 1024,32000,128256,151936,262144 [--tokens 2048]   # memory vs vocabulary

One loss step = forward and backward of the response cross-entropy from final hidden states (N target
positions, H) through the LM head (V, H):
  - plain:   logits = hidden @ W^T (N x V, float32), torch.nn.functional.cross_entropy, backward;
  - chunked: rlhf_time.loss.chunked_sft_loss(chunk_size=C), the path SFTrainer takes; C=0 is the default,
    chunks sized by bytes (loss_chunk_bytes, 128 MiB of float32 logits by default).
With --vocabs, one row per vocabulary: plain, chunked C=1024 (the old fixed default) and chunked by bytes.
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
from toolkit import ROOT, markdown_table, write_results

from rlhf_time.runtime.throughput import process_memory_bytes  # noqa: E402  (toolkit put the repository on the path)


def memory_kb(field: str) -> int:
    value = process_memory_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value // 1024


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
        loss = chunked_sft_loss(hidden, weight, labels, chunk_size=chunk or None)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_gb = (memory_kb("VmHWM") - before) / 2**20
    return {"method": method, "tokens": tokens, "chunk": chunk, "hidden": hidden_size, "peak_extra_gb": peak_gb, "seconds": seconds,
            "loss": float(loss), "grad_weight_norm": float(weight.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", default="1024,2048,4096")
    parser.add_argument("--chunks", default="256,1024,4096")
    parser.add_argument("--vocabs", help="comma-separated vocabulary sizes: peak memory against vocabulary")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method:tokens:chunk, run in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        method, tokens, chunk = args.one.split(":")
        print(json.dumps(measure(method, args.vocab, args.hidden, int(tokens), int(chunk))))
        return

    if args.vocabs:
        return vocab_sweep(args)
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = [run_one(method, tokens, chunk, args.vocab, args) for tokens in (int(t) for t in args.tokens.split(","))
            for method, chunk in [("plain", 0)] + [("chunked", c) for c in chunks]]
    report(rows, chunks, args)


def run_one(method: str, tokens: int, chunk: int, vocab: int, args) -> dict:
    """One measurement in a fresh process (its peak is its own), the row it prints."""
    command = [sys.executable, __file__, "--one", f"{method}:{tokens}:{chunk}", "--vocab", str(vocab),
               "--hidden", str(args.hidden), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["vocab"] = vocab
    print(row, flush=True)
    return row


def vocab_sweep(args) -> None:
    """Peak extra memory of one loss step against the vocabulary, at a fixed number of target tokens."""
    from rlhf_time.loss import chunk_rows

    tokens = int(args.tokens.split(",")[0])
    rows, cells = [], []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        plain, fixed, auto = (run_one(m, tokens, c, vocab, args) for m, c in (("plain", 0), ("chunked", 1024), ("chunked", 0)))
        rows += [plain, fixed, auto]
        head = vocab * args.hidden * 4 / 2**30
        cells.append([f"{vocab:,}", f"{head:.2f}", f"{plain['peak_extra_gb']:.2f}", f"{fixed['peak_extra_gb']:.2f}",
                      f"{auto['peak_extra_gb']:.2f} ({chunk_rows(vocab)})", f"{plain['peak_extra_gb'] - head:.2f}",
                      f"{fixed['peak_extra_gb'] - head:.2f}", f"{auto['peak_extra_gb'] - head:.2f}"])
    lines = [f"{tokens:,} target tokens, hidden {args.hidden}; peak extra memory of one loss step (GB), "
             "and without the LM head's gradient (V x H float32, which every method must hold)", ""]
    lines += markdown_table(["vocabulary", "head gradient (GB)", "plain", "chunked C=1024", "chunked by bytes (rows)",
                             "plain - head grad", "C=1024 - head grad", "by bytes - head grad"], cells)
    write_results(Path(args.out), "loss_memory_vocab", "\n".join(lines), {"args": vars(args), "rows": rows})
    vocab_chart(rows, Path(args.out) / "loss_memory_vocab.png", tokens)


def vocab_chart(rows: list[dict], path: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, method, chunk in (("plain logits + cross-entropy", "plain", 0), ("chunked, 1024 rows", "chunked", 1024),
                                 ("chunked by bytes (128 MiB)", "chunked", 0)):
        points = [(r["vocab"], r["peak_extra_gb"]) for r in rows if r["method"] == method and r["chunk"] == chunk]
        ax.plot([v for v, _ in points], [g for _, g in points], marker="o", label=label)
    heads = sorted({r["vocab"] for r in rows})
    ax.plot(heads, [v * rows[0].get("hidden", 512) * 4 / 2**30 for v in heads], "k--", label="LM head gradient alone")
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("peak extra memory of one loss step (GB)")
    ax.set_title(f"{tokens:,} target tokens, hidden 512")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(rows: list[dict], chunks: list[int], args) -> None:
    logits_gb = lambda n: n * args.vocab * 4 / 2**30  # noqa: E731
    weight_gb = args.vocab * args.hidden * 4 / 2**30
    cells = []
    for tokens in sorted({r["tokens"] for r in rows}):
        plain = next(r for r in rows if r["tokens"] == tokens and r["method"] == "plain")
        chunked = [next(r for r in rows if r["tokens"] == tokens and r["chunk"] == c) for c in chunks]
        difference = max(abs(r["loss"] - plain["loss"]) for r in chunked)
        cells.append([f"{tokens:,}", f"{logits_gb(tokens):.2f}", f"{plain['peak_extra_gb']:.2f}",
                      *(f"{r['peak_extra_gb']:.2f}" for r in chunked), f"{difference:.1e}"])
    lines = [f"vocabulary {args.vocab:,}, hidden {args.hidden}: one float32 N x V logits tensor = N x "
             f"{args.vocab * 4 / 2**20:.2f} MB; the LM head's gradient alone = {weight_gb:.2f} GB", ""]
    lines += markdown_table(["target tokens N", "N x V float32 logits (GB)", "plain: peak extra (GB)",
                             *(f"chunked C={c}: peak extra (GB)" for c in chunks), "max loss difference"], cells)
    write_results(Path(args.out), "loss_memory", "\n".join(lines), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
